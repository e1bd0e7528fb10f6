"""Generation throughput: gopd_jax.generate vs transformers `generate` on the same checkpoint.

CPU default (a small Qwen3): `python -m experiments.bench_generate`
GPU (Qwen3-0.6B shapes, random weights, bf16):
    `python -m experiments.bench_generate --preset qwen3-0.6b --batch 64 256 --prompt 512 --new 128 --dtype bfloat16`
MoE teacher (Qwen3-30B-A3B shapes, layers reduced to fit one card; times also reported per layer):
    `python -m experiments.bench_generate --preset qwen3-30b-a3b --layers 12 --batch 64 256 --dtype bfloat16 \
        --skip-transformers`
Prints end-to-end new tokens/s (prefill included, as transformers is timed) for both and their ratio, then the
decode phase alone (total minus a separately timed prefill) as a fraction of its HBM roofline: every weight plus the
KV cache read once per step, at the datasheet bandwidth and at the copy bandwidth measured on the device.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from gopd_jax.generate import SamplingConfig, generate
from gopd_jax.models import (QWEN3_0_6B, QWEN3_30B_A3B, Qwen3Config, init_cache, init_params, prefill,
                             save_hf_checkpoint)
from gopd_jax.models.qwen3 import ATTENTION_IMPLS

SMALL = Qwen3Config(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64)
PRESETS = {"small": SMALL, "qwen3-0.6b": QWEN3_0_6B, "qwen3-30b-a3b": QWEN3_30B_A3B}
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}  # datasheet


def experts_touched(config: Qwen3Config, batch: int) -> float:
    """Expected distinct experts one MoE layer reads for `batch` tokens routed uniformly at random to top-k
    (random weights route near uniformly; trained routers are more skewed, so this is the upper end)."""
    e, k = config.num_experts, config.num_experts_per_tok
    return e * (1 - (1 - k / e) ** batch)


def decode_weight_bytes(config: Qwen3Config, batch: int, dtype_bytes: int) -> float:
    """Weight bytes one decode step must read: every dense weight once, the unembedding (an untied input
    embedding is only gathered: B rows), and of each MoE layer only the experts its tokens route to."""
    c = config
    params = c.num_params() - (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)
    if c.is_moe:
        sparse = sum(c.is_sparse_layer(i) for i in range(c.num_hidden_layers))
        expert = 3 * c.hidden_size * c.moe_intermediate_size
        params -= sparse * c.num_experts * expert
        params += sparse * experts_touched(c, batch) * expert
    return params * dtype_bytes


def decode_step_bytes(config: Qwen3Config, batch: int, context: float, dtype_bytes: int) -> float:
    """Fewest HBM bytes of one decode step: the weights it needs (`decode_weight_bytes`) plus each row's KV
    cache up to `context` tokens."""
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype_bytes
    return decode_weight_bytes(config, batch, dtype_bytes) + batch * context * kv_per_token


def measured_copy_bandwidth(gib: float = 4.0) -> float:
    """Bytes read + written per second by a large on-device elementwise pass (the practical HBM ceiling)."""
    x = jnp.ones((int(gib * 2**30) // 2,), jnp.bfloat16)
    double = jax.jit(lambda a: a * 2)
    seconds = best_seconds(lambda _: double(x), 10)
    return 2 * x.nbytes / seconds


def best_seconds(fn, repeats):
    """Best wall time of fn(r) over `repeats` calls after one warm-up (compile) call."""
    jax.block_until_ready(fn(0))
    best = float("inf")
    for r in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(r))
        best = min(best, time.perf_counter() - t0)
    return best


def time_ours(params, config, prompts, lengths, new, repeats, attention):
    """(seconds for prefill + `new` decode steps, seconds for the prefill alone), greedy, no early stop."""
    b, tp = prompts.shape
    sampling = SamplingConfig(max_new_tokens=new, temperature=0.0)
    total = best_seconds(lambda r: generate(params, config, prompts, lengths, jax.random.key(r), sampling,
                                            attention), repeats)
    # The cache is returned so its writes are part of the prefill's time, as they are inside generate.
    only_prefill = jax.jit(lambda p, t, n: prefill(p, config, t, n, init_cache(config, b, tp + new, p["embed"].dtype),
                                                   attention))
    return total, best_seconds(lambda _: only_prefill(params, prompts, lengths), repeats)


def time_transformers(path, prompts, new, repeats, dtype):
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    ids = torch.tensor(np.asarray(prompts), dtype=torch.long, device=device)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(ids, **kw)
        best = float("inf")
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, **kw)
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return ids.shape[0] * new / best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--layers", type=int, default=0, help="reduce the preset's layers (0: all); times are also "
                    "printed per layer")
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attention", nargs="+", default=["auto"], choices=ATTENTION_IMPLS,
                    help="generation attention paths to time (see gopd_jax.models.qwen3.use_fused_attention)")
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args(argv)

    config = PRESETS[args.preset]
    if args.layers:
        config = dataclasses.replace(config, num_hidden_layers=args.layers)
    dtype = getattr(jnp, args.dtype)
    params = init_params(config, jax.random.key(0), dtype)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}); preset {args.preset} "
          f"({config.num_hidden_layers} layers, {config.num_params() / 1e9:.2f}B params); dtype {args.dtype}; "
          f"prompt {args.prompt}; new {args.new}")
    if config.is_moe:
        print("MoE: weights read per decode step (experts touched at random routing): " + ", ".join(
            f"batch {b}: {experts_touched(config, b):.1f}/{config.num_experts} experts, "
            f"{decode_weight_bytes(config, b, jnp.dtype(dtype).itemsize) / 1e9:.2f} GB" for b in args.batch))
    datasheet = next((v for k, v in HBM_BYTES_PER_S.items() if k in device.device_kind), None)
    measured = measured_copy_bandwidth() if jax.default_backend() == "gpu" else None
    if measured:
        print(f"HBM: measured copy {measured / 1e12:.2f} TB/s (read + write), datasheet "
              f"{(datasheet or float('nan')) / 1e12:.2f} TB/s")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_transformers:
            save_hf_checkpoint(params, config, tmp)
        rows = []
        for batch in args.batch:
            rng = np.random.default_rng(batch)
            prompts = jnp.asarray(rng.integers(1, config.vocab_size, (batch, args.prompt)), jnp.int32)
            lengths = jnp.full((batch,), args.prompt, jnp.int32)
            ref = float("nan") if args.skip_transformers else time_transformers(tmp, prompts, args.new,
                                                                                 args.repeats, args.dtype)
            # Decode phase alone against its HBM floor (mean context: prompt + half the new tokens).
            floor = args.new * decode_step_bytes(config, batch, args.prompt + args.new / 2,
                                                 jnp.dtype(dtype).itemsize)
            for attention in args.attention:
                try:
                    total, pre = time_ours(params, config, prompts, lengths, args.new, args.repeats, attention)
                except Exception as e:  # one failing path must not cost the other rows
                    rows.append(f"| {batch} | {attention} | failed: {type(e).__name__}: {str(e)[:300]} |")
                    print(rows[-1], flush=True)
                    continue
                ours, decode = batch * args.new / total, total - pre
                roof = {name: 100 * floor / bw / decode if bw else float("nan")
                        for name, bw in (("datasheet", datasheet), ("measured", measured))}
                per_layer = decode / args.new / config.num_hidden_layers * 1e6
                rows.append(f"| {batch} | {attention} | {ours:,.0f} | {ref:,.0f} | {ours / ref:.2f}x | {pre * 1e3:.0f} | "
                            f"{decode * 1e3:.0f} | {batch * args.new / decode:,.0f} | {per_layer:.0f} | "
                            f"{roof['datasheet']:.0f}% | {roof['measured']:.0f}% |")
                print(rows[-1], flush=True)
    print("\n| batch | attention | gopd_jax tok/s | transformers tok/s | ratio | prefill ms | decode ms | decode tok/s "
          "| decode us per step per layer | decode % of HBM roofline (datasheet) | (measured copy BW) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
