"""Batched sampling: one jitted prefill + decode loop over a KV cache.

Prompts are right padded; every row decodes at its own position, so no row attends to padding and no
row waits on another's prompt length. The loop stops as soon as every row has emitted a stop token.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gopd_jax.models import Qwen3Config, decode_step, init_cache, prefill
from gopd_jax.models.qwen3 import DECODE_SPLIT, use_fused_attention


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static sampling settings. temperature 0 means greedy."""

    max_new_tokens: int = 512
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    stop_token_ids: tuple[int, ...] = ()
    pad_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling settings: temperature={self.temperature} (>= 0), "
                             f"top_p={self.top_p} (in (0, 1]), top_k={self.top_k} (>= 0)")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


class Generation(NamedTuple):
    tokens: jax.Array  # [B, N] int32, pad_id after each row's end
    logprobs: jax.Array  # [B, N] float32: log-prob of each token under the distribution it was drawn from
    lengths: jax.Array  # [B] int32: new tokens per row, the stop token included


def sampling_distribution(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """float32 logits [B, V] -> log-probs of the distribution actually sampled from (temperature, top-k,
    top-p applied). Greedy (temperature 0) reports the untempered distribution."""
    logits = logits.astype(jnp.float32)
    if sampling.temperature > 0:
        logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        keep = (jnp.cumsum(probs, axis=-1) - probs) < sampling.top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.nn.log_softmax(logits, axis=-1)


def _pick(row_keys, logprobs, sampling):
    if sampling.temperature == 0:
        return jnp.argmax(logprobs, axis=-1).astype(jnp.int32)
    return jax.vmap(jax.random.categorical)(row_keys, logprobs).astype(jnp.int32)


def row_keys(key: jax.Array, batch: int) -> jax.Array:
    """One typed PRNG key per row: `key` split in `batch`, or `key` itself when it already holds one key per
    row. Per-row keys make a row's sample independent of which other rows share its batch."""
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        return jax.random.split(key, batch)
    if key.shape != (batch,):
        raise ValueError(f"expected one PRNG key or {batch} row keys, got key shape {key.shape}")
    return key


@partial(jax.jit, static_argnames=("config", "sampling", "attention"))
def generate(params, config: Qwen3Config, prompt_tokens: jax.Array, prompt_lengths: jax.Array, key: jax.Array,
             sampling: SamplingConfig, attention: str = "auto") -> Generation:
    """Sample up to `sampling.max_new_tokens` tokens for each right-padded prompt row.

    prompt_tokens [B, Tp] int32, prompt_lengths [B] int32 (>= 1). `key`: one PRNG key, or one per row
    ([B]); with per-row keys each row's tokens depend only on its own prompt and key. Deterministic.
    `attention`: "auto" (fused kernels on GPU for bf16/fp16 weights), "xla" or "fused" (see
    `gopd_jax.models.qwen3.use_fused_attention`)."""
    b, tp = prompt_tokens.shape
    keys = row_keys(key, b)
    n = sampling.max_new_tokens
    prompt_lengths = prompt_lengths.astype(jnp.int32)
    slots = tp + n
    if use_fused_attention(attention, params["embed"].dtype):
        slots = -(-slots // DECODE_SPLIT) * DECODE_SPLIT  # the fused kernel never reads the rounding
    cache = init_cache(config, b, slots, params["embed"].dtype)
    logits, cache = prefill(params, config, prompt_tokens, prompt_lengths, cache, attention)
    stops = jnp.asarray(sampling.stop_token_ids or (-1,), jnp.int32)

    def cond(state):
        i, done = state[0], state[3]
        return (i < n) & ~jnp.all(done)

    def body(state):
        i, tokens, logps, done, logits, cache = state
        dist = sampling_distribution(logits, sampling)
        token = _pick(jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i), dist, sampling)
        logp = jnp.take_along_axis(dist, token[:, None], axis=-1)[:, 0]
        token = jnp.where(done, sampling.pad_id, token)
        tokens = tokens.at[:, i].set(token)
        logps = logps.at[:, i].set(jnp.where(done, 0.0, logp))
        done = done | jnp.any(token[:, None] == stops[None, :], axis=-1)
        logits, cache = decode_step(params, config, token, prompt_lengths + i, cache, attention)
        return i + 1, tokens, logps, done, logits, cache

    state = (jnp.int32(0), jnp.full((b, n), sampling.pad_id, jnp.int32), jnp.zeros((b, n), jnp.float32),
             jnp.zeros((b,), bool), logits, cache)
    steps, tokens, logps, done, _, _ = jax.lax.while_loop(cond, body, state)
    is_stop = jnp.any(tokens[:, :, None] == stops[None, None, :], axis=-1)
    first_stop = jnp.argmax(is_stop, axis=-1)
    lengths = jnp.where(jnp.any(is_stop, axis=-1), first_stop + 1, steps).astype(jnp.int32)
    return Generation(tokens, logps, lengths)
