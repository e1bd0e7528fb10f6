"""Qwen3 (dense) and Qwen3-MoE as a params pytree plus pure functions.

Params are nested dicts of arrays with weights stored `[in, out]` (the transpose of HF's `[out, in]`):

    {"embed": [V, D], "final_norm": [D], "lm_head": [D, V] (only when embeddings are untied),
     "layers": [{"input_norm": [D], "post_norm": [D],
                 "attn": {"q": [D, H*hd], "k": [D, K*hd], "v": [D, K*hd], "o": [H*hd, D],
                          "q_norm": [hd], "k_norm": [hd]},
                 "mlp": {"gate": [D, F], "up": [D, F], "down": [F, D]}            # dense layers
                 "moe": {"router": [D, E], "gate": [E, D, Fe], "up": [E, D, Fe], "down": [E, Fe, D]}},  # sparse
                ...]}

Layers are a Python list (unrolled under jit) because MoE checkpoints may mix dense and sparse layers
(`mlp_only_layers`, `decoder_sparse_step`). All functions take `config` as a static argument.
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from gopd_jax.models.config import Qwen3Config

Params = dict
# One {"k": [B, K, S, hd], "v": [B, K, S, hd]} per layer: (batch, kv head) leading, so decode attention is a
# plain batched matmul over the cache without a transposed copy of it.
KVCache = list


# ---- initialisation ---------------------------------------------------------------------------

def init_params(config: Qwen3Config, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random weights (normal, std 0.02; norms at 1) for any Qwen3 / Qwen3-MoE config."""
    c = config
    d, hd = c.hidden_size, c.head_dim
    keys = iter(jax.random.split(key, 2 + 8 * c.num_hidden_layers))

    def dense(*shape):
        return (0.02 * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    def ones(n):
        return jnp.ones((n,), dtype)

    layers = []
    for i in range(c.num_hidden_layers):
        layer = {
            "input_norm": ones(d), "post_norm": ones(d),
            "attn": {"q": dense(d, c.num_attention_heads * hd), "k": dense(d, c.num_key_value_heads * hd),
                     "v": dense(d, c.num_key_value_heads * hd), "o": dense(c.num_attention_heads * hd, d),
                     "q_norm": ones(hd), "k_norm": ones(hd)},
        }
        if c.is_sparse_layer(i):
            e, f = c.num_experts, c.moe_intermediate_size
            layer["moe"] = {"router": dense(d, e), "gate": dense(e, d, f), "up": dense(e, d, f),
                            "down": dense(e, f, d)}
        else:
            f = c.intermediate_size
            layer["mlp"] = {"gate": dense(d, f), "up": dense(d, f), "down": dense(f, d)}
        layers.append(layer)
    params = {"embed": dense(c.vocab_size, d), "final_norm": ones(d), "layers": layers}
    if not c.tie_word_embeddings:
        params["lm_head"] = dense(d, c.vocab_size)
    return params


# ---- building blocks ----------------------------------------------------------------------------

def rms_norm(x, weight, eps):
    """RMSNorm computed in float32, cast back to the input dtype (as transformers does)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def rope(x, positions, theta):
    """Rotary embedding, half-rotation layout. x: [B, T, N, hd]; positions: [B, T] int."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def _mlp(p, x):
    return (jax.nn.silu(x @ p["gate"]) * (x @ p["up"])) @ p["down"]


def _route(p, config: Qwen3Config, x):
    """Top-k softmax routing as in transformers: softmax in float32, optional renormalisation."""
    probs = jax.nn.softmax((x @ p["router"]).astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, config.num_experts_per_tok)
    if config.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(x.dtype), experts


def _experts_dense(p, x, weights, experts):
    """Exact reference: every expert of `p` on every token, combined with the routing weights. experts [N, k]
    index p's expert axis; an id outside it (another device's expert) contributes nothing. Cheap only for tiny
    expert counts; used on CPU and as the test reference for `_experts_grouped`. Returns float32 [N, D]."""
    combine = jnp.sum(jax.nn.one_hot(experts, p["gate"].shape[0], dtype=x.dtype) * weights[..., None], axis=-2)
    h = jax.nn.silu(jnp.einsum("nd,edf->nef", x, p["gate"])) * jnp.einsum("nd,edf->nef", x, p["up"])
    y = jnp.einsum("nef,efd->ned", h, p["down"])
    return jnp.einsum("ned,ne->nd", y, combine, preferred_element_type=jnp.float32)


def _experts_grouped(p, x, weights, experts):
    """Grouped path: token copies sorted by expert and multiplied with `ragged_dot`, so each token only
    touches its top-k experts (the FLOPs of an active-parameter model). Copies routed outside p's experts sort
    last, past every group, and are dropped. Same contract as `_experts_dense`."""
    e, k = p["gate"].shape[0], experts.shape[-1]
    flat = experts.reshape(-1)
    local = (flat >= 0) & (flat < e)
    flat = jnp.where(local, flat, e)
    order = jnp.argsort(flat, stable=True)
    xs = x[order // k]
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    h = jax.nn.silu(jax.lax.ragged_dot(xs, p["gate"], sizes)) * jax.lax.ragged_dot(xs, p["up"], sizes)
    ys = jax.lax.ragged_dot(h, p["down"], sizes)
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(x.shape[0], k, -1)
    # Dropped copies lie past the last group, where ragged_dot's output is not to be relied on: select them
    # away (weighting by 0 would let a NaN through).
    y = jnp.where(local.reshape(x.shape[0], k, 1), y, 0)
    return jnp.einsum("nkd,nk->nd", y, weights, preferred_element_type=jnp.float32)


def moe(p, config: Qwen3Config, x, grouped: Optional[bool] = None):
    """The MoE feed-forward of tokens x [N, D]: `_route`, then the routed experts, combined in float32.

    grouped: the `ragged_dot` path (default off CPU) or the dense reference (default on CPU). With
    `config.expert_mesh` the experts in `p` are split over that mesh (`scoring.shard_params(..., "expert")`)
    and the layer runs expert parallel under `shard_map`: the (replicated) tokens are routed as on one device,
    each device runs its own experts on the copies routed to them, and one psum of [N, D] combines the
    devices; no expert weight leaves its device."""
    if grouped is None:
        grouped = jax.default_backend() != "cpu"
    experts_fn = _experts_grouped if grouped else _experts_dense
    weights, experts = _route(p, config, x)
    ffn = {name: p[name] for name in ("gate", "up", "down")}
    mesh = config.expert_mesh
    if mesh is None:
        return experts_fn(ffn, x, weights, experts).astype(x.dtype)
    axis, = mesh.axis_names

    def local(ffn, x, weights, experts):
        first = jax.lax.axis_index(axis) * ffn["gate"].shape[0]  # this device's block of the expert axis
        return jax.lax.psum(experts_fn(ffn, x, weights, experts - first), axis)

    replicated = PartitionSpec()
    y = jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(axis), replicated, replicated, replicated),
                      out_specs=replicated)(ffn, x, weights, experts)
    return y.astype(x.dtype)


def _moe(p, config: Qwen3Config, x):
    b, t, d = x.shape
    return moe(p, config, x.reshape(b * t, d)).reshape(b, t, d)


def _qkv(p, config: Qwen3Config, x, positions):
    b, t, _ = x.shape
    hd = config.head_dim
    q = (x @ p["q"]).reshape(b, t, config.num_attention_heads, hd)
    k = (x @ p["k"]).reshape(b, t, config.num_key_value_heads, hd)
    v = (x @ p["v"]).reshape(b, t, config.num_key_value_heads, hd)
    q = rope(rms_norm(q, p["q_norm"], config.rms_norm_eps), positions, config.rope_theta)
    k = rope(rms_norm(k, p["k_norm"], config.rms_norm_eps), positions, config.rope_theta)
    return q, k, v


ATTENTION_BLOCK = 128  # query rows per block of causal attention
MAX_ATTENTION_BLOCKS = 16  # longer sequences get wider blocks: the blocks are unrolled per layer (compile time)


def attention_block(t: int) -> int:
    """Query rows per block of `causal_attention` for a length-`t` sequence."""
    return max(ATTENTION_BLOCK, -(-t // MAX_ATTENTION_BLOCKS))


def causal_attention(q, k, v, block: int | None = None):
    """Causal GQA attention (softmax in float32 inside `dot_product_attention`), one block of query rows at a
    time against only the keys it can see: the masked upper triangle is never computed, about half the work
    (experiments/bench_attention.py). Each block runs under `jax.checkpoint`, so neither the forward nor the
    backward pass holds more than one block's [B, H, block, T] scores (a 10k-token prompt's whole [B, H, T, T]
    would need tens of GB)."""
    t = q.shape[1]
    block = block or attention_block(t)
    out = [_attend_block(q[:, s:s + block], k[:, :s + block], v[:, :s + block], s) for s in range(0, t, block)]
    return out[0] if len(out) == 1 else jnp.concatenate(out, axis=1)


@functools.partial(jax.checkpoint, static_argnums=(3,))
def _attend_block(q, k, v, start: int):
    """Query rows start.. of a sequence against its keys 0..start + rows (the last of them causally masked)."""
    mask = (start + jnp.arange(q.shape[1]))[:, None] >= jnp.arange(k.shape[1])[None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask[None, None])


ATTENTION_IMPLS = ("auto", "xla", "fused")


_HALF = (jnp.bfloat16, jnp.float16)


def use_fused_attention(attention: str, dtype) -> bool:
    """Whether generation uses the fused kernels: cuDNN flash attention for the prefill and a Pallas
    split-k flash-decoding kernel that reads only each row's valid cache prefix. "auto" picks them on GPU
    for 16-bit activations; "xla" is the portable path (and exact in float32); "fused" forces them (on CPU
    the decode kernel runs in Pallas' interpreter and the prefill stays on XLA: for tests only)."""
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {attention!r}")
    if attention == "fused" and _pallas_decode() is None:
        raise ValueError("attention='fused' needs jax.experimental.pallas.ops.gpu.decode_attention, which this jax "
                         "no longer ships; use attention='xla'")
    return attention == "fused" or (attention == "auto" and jnp.dtype(dtype) in _HALF
                                     and jax.default_backend() == "gpu" and _pallas_decode() is not None)


def _use_cudnn_prefill(attention: str, dtype) -> bool:
    """The fused prefill runs where cuDNN flash attention does: on a GPU, for 16-bit inputs only."""
    return use_fused_attention(attention, dtype) and jax.default_backend() == "gpu" and jnp.dtype(dtype) in _HALF


@functools.cache
def _pallas_decode():
    """JAX's Pallas (Triton) flash-decoding op, or None where this jax version has dropped it (it is
    deprecated with the Pallas Triton backend as of jax 0.11)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.experimental.pallas.ops.gpu import decode_attention
    except ImportError:
        return None
    return decode_attention


DECODE_SPLIT = 128  # cache positions per split of the fused decode kernel (a power of two for Triton)


def decode_attention(q, k_cache, v_cache, lengths, fused: bool = False):
    """One query per row against its cache prefix. q [B, H, hd]; caches [B, K, S, hd]; lengths [B] (keys
    0..length-1 are attended). Scores and softmax in float32; returns [B, H, hd] in q's dtype.

    fused: the Pallas flash-decoding kernel (S must be a multiple of DECODE_SPLIT); it skips the splits
    past each row's length, where the XLA path reads the whole cache slab."""
    b, h, hd = q.shape
    kv_heads, s = k_cache.shape[1], k_cache.shape[2]
    if fused:
        if s % DECODE_SPLIT:
            raise ValueError(f"fused decode attention needs a cache length divisible by {DECODE_SPLIT}, got {s}; "
                             f"round the cache length up (generate does)")
        out = _pallas_decode().mqa(
            q.reshape(b * kv_heads, h // kv_heads, hd), k_cache.reshape(b * kv_heads, s, hd).astype(q.dtype),
            v_cache.reshape(b * kv_heads, s, hd).astype(q.dtype), kv_seq_len=jnp.repeat(lengths, kv_heads),
            sm_scale=hd ** -0.5, block_k=DECODE_SPLIT, k_splits=s // DECODE_SPLIT,
            interpret=jax.default_backend() != "gpu")
        return out.reshape(b, h, hd).astype(q.dtype)
    qg = q.reshape(b, kv_heads, h // kv_heads, hd)
    scores = jnp.einsum("bkgd,bksd->bkgs", qg, k_cache, preferred_element_type=jnp.float32)
    valid = (jnp.arange(s)[None, :] < lengths[:, None])[:, None, None, :]
    probs = jax.nn.softmax(jnp.where(valid, scores * hd ** -0.5, -jnp.inf), axis=-1)
    out = jnp.einsum("bkgs,bksd->bkgd", probs.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
    return out.reshape(b, h, hd).astype(q.dtype)


def _layer(p, config: Qwen3Config, layer: int, x, positions, cache, mode, attention="xla"):
    """One decoder layer. mode: "full" (no cache), "prefill" (write the cache from 0), "decode" (T == 1,
    write each row's token at its own position and attend to the row's valid prefix only)."""
    b, t, _ = x.shape
    a = p["attn"]
    h = rms_norm(x, p["input_norm"], config.rms_norm_eps)
    q, k, v = _qkv(a, config, h, positions)
    if mode == "decode":
        rows = jnp.arange(b)
        pos = positions[:, 0]
        cache = {name: cache[name].at[rows, :, pos].set(new[:, 0].astype(cache[name].dtype))
                 for name, new in (("k", k), ("v", v))}
        out = decode_attention(q[:, 0], cache["k"], cache["v"], pos + 1, use_fused_attention(attention, q.dtype))
    else:
        if mode == "prefill":
            cache = {name: jax.lax.dynamic_update_slice(cache[name], new.swapaxes(1, 2).astype(cache[name].dtype),
                                                        (0, 0, 0, 0))
                     for name, new in (("k", k), ("v", v))}
        if (mode == "prefill" and _use_cudnn_prefill(attention, q.dtype)) or (mode == "full" and attention == "cudnn"):
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        else:
            out = causal_attention(q, k, v)
    x = x + out.reshape(b, t, -1) @ a["o"]
    h = rms_norm(x, p["post_norm"], config.rms_norm_eps)
    x = x + (_moe(p["moe"], config, h) if config.is_sparse_layer(layer) else _mlp(p["mlp"], h))
    return x, cache


def _decoder(params, config, tokens, positions, cache, mode, attention="xla", remat="none"):
    x = params["embed"][tokens]
    new_cache = []
    for i, lp in enumerate(params["layers"]):
        if remat != "none":  # training forward only (mode "full": no cache)
            layer = functools.partial(_layer, config=config, layer=i, positions=positions, cache=None, mode=mode,
                                      attention=attention)
            x, c = jax.checkpoint(lambda p, h: layer(p, x=h), policy=REMAT_POLICIES[remat])(lp, x)
        else:
            x, c = _layer(lp, config, i, x, positions, None if cache is None else cache[i], mode, attention)
        new_cache.append(c)
    return rms_norm(x, params["final_norm"], config.rms_norm_eps), new_cache


# What the backward pass keeps of each decoder layer (jax.checkpoint policies); the rest is recomputed.
# "none": no rematerialisation (everything saved); "full": only the layer input; "dots": matmul outputs
# without batch dimensions (projections, MLP), recomputing norms, activations and attention.
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
TRAIN_ATTENTION = ("xla", "cudnn")


def check_train_options(attention: str, remat: str) -> None:
    """attention: "xla" (blocked causal attention, any backend) or "cudnn" (cuDNN flash attention forward and
    backward; GPU, 16-bit activations). remat: a key of REMAT_POLICIES."""
    if attention not in TRAIN_ATTENTION:
        raise ValueError(f"training attention must be one of {TRAIN_ATTENTION}, got {attention!r}")
    if attention == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError("attention='cudnn' needs a GPU (cuDNN flash attention); use attention='xla'")
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {remat!r}")


# ---- public API ---------------------------------------------------------------------------------

def output_head(params: Params, config: Qwen3Config) -> jax.Array:
    """The [D, V] unembedding matrix (the transposed input embedding when tied)."""
    return params["embed"].T if config.tie_word_embeddings else params["lm_head"]


def unembed(params: Params, config: Qwen3Config, hidden: jax.Array) -> jax.Array:
    """Final hidden states -> float32 logits."""
    return jnp.matmul(hidden, output_head(params, config), preferred_element_type=jnp.float32)


def forward_hidden(params: Params, config: Qwen3Config, tokens: jax.Array, attention: str = "xla",
                   remat: str = "none") -> jax.Array:
    """[B, T] token ids -> [B, T, D] final-normed hidden states; causal, positions 0..T-1.

    Right padding is exact: a row's outputs before its padding never see the padding. attention and remat
    (static) choose the training path: see `check_train_options`."""
    check_train_options(attention, remat)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hidden, _ = _decoder(params, config, tokens, positions, None, "full", attention, remat)
    return hidden


def forward(params: Params, config: Qwen3Config, tokens: jax.Array) -> jax.Array:
    """[B, T] token ids -> [B, T, V] float32 logits."""
    return unembed(params, config, forward_hidden(params, config, tokens))


def init_cache(config: Qwen3Config, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.num_hidden_layers)]


def prefill(params: Params, config: Qwen3Config, tokens: jax.Array, lengths: jax.Array, cache: KVCache,
            attention: str = "auto"):
    """Run right-padded prompts [B, T] (valid lengths [B]) and fill cache positions 0..T-1.

    Returns (float32 logits at each row's last valid token [B, V], cache). Cache entries past a row's
    length hold padding; decoding overwrites them before they can be attended to. `attention`: see
    `use_fused_attention` (static)."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hidden, cache = _decoder(params, config, tokens, positions, cache, "prefill", attention)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    return unembed(params, config, last), cache


def decode_step(params: Params, config: Qwen3Config, tokens: jax.Array, positions: jax.Array, cache: KVCache,
                attention: str = "auto"):
    """One token per row: tokens [B] at positions [B] -> (float32 logits [B, V], cache)."""
    hidden, cache = _decoder(params, config, tokens[:, None], positions[:, None].astype(jnp.int32), cache,
                             "decode", attention)
    return unembed(params, config, hidden[:, 0]), cache
