"""Teacher scoring speed (`scoring.teacher_logprobs`) against the FLOP roofline, and the MoE feed-forward paths.

    # GPU: Qwen3-30B-A3B shapes, random bf16 weights, layers reduced to fit one card (also reported per layer)
    python -m experiments.bench_scoring --preset qwen3-30b-a3b --layers 12 --batch 8 --seq 2048
    # CPU: a small MoE
    python -m experiments.bench_scoring

Scoring model FLOPs per token = 2 x active params (dense weights, the k routed experts of each MoE layer, the
head; not the input embedding, a gather) + 4 x layers x heads x head_dim x seq (attention scores and values,
no causal saving, as bench_train counts). The MoE table times one layer's feed-forward on N tokens: "grouped"
(tokens sorted by expert, `ragged_dot`: active FLOPs only) vs "dense" (every expert on every token); decode
sizes (N = batch) against the HBM roofline of the experts touched, scoring sizes against the FLOP roofline.
With several devices, --shard tensor|expert places the teacher as the runner does (`device_plan.place_teacher`);
expert parallel also times the MoE table's layer under `shard_map` (each device on its own experts).
"""
from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_generate import HBM_BYTES_PER_S, best_seconds, experts_touched
from gopd_jax import scoring
from gopd_jax.models import QWEN3_30B_A3B, Qwen3Config, init_params
from gopd_jax.models.qwen3 import moe

SMALL_MOE = Qwen3Config(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False,
                        num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128)
PRESETS = {"small-moe": SMALL_MOE, "qwen3-30b-a3b": QWEN3_30B_A3B}


def active_params(config: Qwen3Config) -> int:
    """Weights one token multiplies with: all but the input embedding's table and the unrouted experts."""
    c = config
    params = c.num_params() - c.vocab_size * c.hidden_size * (0 if c.tie_word_embeddings else 1)
    if c.is_moe:
        sparse = sum(c.is_sparse_layer(i) for i in range(c.num_hidden_layers))
        params -= sparse * (c.num_experts - c.num_experts_per_tok) * 3 * c.hidden_size * c.moe_intermediate_size
    return params


def scoring_flops(config: Qwen3Config, batch: int, seq: int) -> float:
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq
    return (2 * active_params(config) + attention) * batch * seq


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small-moe")
    ap.add_argument("--layers", type=int, default=0, help="reduce the preset's layers (0: all)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--shard", choices=("none", "tensor", "expert"), default="none")
    ap.add_argument("--moe-tokens", type=int, nargs="*", default=[64, 256, 4096],
                    help="token counts for the MoE feed-forward table (decode batch sizes, then a scoring chunk)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="H100/H200 dense bf16")
    args = ap.parse_args(argv)

    config = PRESETS[args.preset]
    if args.layers:
        config = dataclasses.replace(config, num_hidden_layers=args.layers)
    dtype = jnp.dtype(args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16"))
    device = jax.devices()[0]
    params = init_params(config, jax.random.PRNGKey(0), dtype)
    if args.shard != "none":
        params, config = scoring.shard_params(params, config, scoring.make_mesh(), args.shard)
    print(f"device {device.device_kind} x {jax.device_count()} ({jax.default_backend()}); preset {args.preset} "
          f"({config.num_hidden_layers} layers, {config.num_params() / 1e9:.2f}B params, {active_params(config) / 1e9:.2f}B "
          f"active); {dtype.name}; shard {args.shard}", flush=True)

    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, config.vocab_size, (args.batch, args.seq)), jnp.int32)
    targets = jnp.roll(tokens, -1, axis=1)
    seconds = best_seconds(lambda _: scoring.teacher_logprobs(params, config, tokens, targets), args.repeats)
    n = args.batch * args.seq
    tflops = scoring_flops(config, args.batch, args.seq) / seconds / 1e12
    print(f"scoring {args.batch} x {args.seq}: {seconds * 1e3:.1f} ms, {n / seconds:,.0f} tokens/s, "
          f"{seconds / config.num_hidden_layers * 1e3:.2f} ms per layer, {tflops:.1f} model TFLOP/s = "
          f"{100 * tflops / args.peak_tflops:.1f}% of {args.peak_tflops:g}", flush=True)

    if not config.is_moe or not args.moe_tokens:
        return
    bandwidth = next((v for k, v in HBM_BYTES_PER_S.items() if k in device.device_kind), None)
    layer = next(lp["moe"] for lp in params["layers"] if "moe" in lp)
    d, f, k = config.hidden_size, config.moe_intermediate_size, config.num_experts_per_tok
    print("\n| tokens | path | ms | % of HBM roofline (experts touched) | % of FLOP roofline (active) |\n|---|---|---|---|---|")
    for tokens_n in args.moe_tokens:
        x = jax.random.normal(jax.random.PRNGKey(tokens_n), (tokens_n, d), dtype)
        bytes_needed = experts_touched(config, tokens_n) * 3 * d * f * dtype.itemsize
        flops = 2 * 3 * d * f * k * tokens_n
        for name, grouped in (("grouped", True), ("dense", False)):
            fn = jax.jit(lambda p, x, grouped=grouped: moe(p, config, x, grouped))
            try:
                t = best_seconds(lambda _: fn(layer, x), args.repeats)
            except Exception as e:  # e.g. dense out of memory at scoring sizes: report, keep going
                print(f"| {tokens_n} | {name} | failed: {type(e).__name__}: {str(e)[:200]} | | |")
                continue
            hbm = f"{100 * bytes_needed / t / bandwidth:.0f}%" if bandwidth else "n/a"
            print(f"| {tokens_n} | {name} | {t * 1e3:.3f} | {hbm} | {100 * flops / t / 1e12 / args.peak_tflops:.1f}% |",
                  flush=True)


if __name__ == "__main__":
    main()
