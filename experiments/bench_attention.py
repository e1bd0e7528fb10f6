"""Causal attention by query blocks (the triangle above the diagonal never computed) against the same attention
as one masked block, forward + backward, and the effect on whole mini-preset models.

    .venv/bin/python -m experiments.bench_attention            # CPU, the mini preset's shapes (8-row micro-batches)

Times are the best of --repeats calls after a compile; the ratio is one-block time / blocked time.
"""
import argparse
import time

import jax
import jax.numpy as jnp

from gopd_jax.models import init_params, qwen3


def best_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times)


def attention_fwd_bwd(rows: int, seq: int, heads: int, kv_heads: int, head_dim: int, block, repeats: int) -> float:
    q, k, v = (jax.random.normal(key, (rows, seq, h, head_dim))
               for key, h in zip(jax.random.split(jax.random.key(0), 3), (heads, kv_heads, kv_heads)))
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(qwen3.causal_attention(*a, block=block) ** 2), argnums=(0, 1, 2)))
    return best_time(grad, q, k, v, repeats=repeats)


def model_fwd_bwd(config, rows: int, seq: int, one_block: bool, repeats: int) -> float:
    blocked = qwen3.causal_attention
    if one_block:  # the same model with attention as one masked block (the comparison's baseline)
        qwen3.causal_attention = lambda q, k, v: blocked(q, k, v, block=q.shape[1])
    try:
        params = init_params(config, jax.random.PRNGKey(0))
        tokens = jax.random.randint(jax.random.PRNGKey(1), (rows, seq), 0, config.vocab_size)
        grad = jax.jit(jax.grad(lambda p: jnp.mean(qwen3.forward(p, config, tokens).astype(jnp.float32) ** 2)))
        return best_time(grad, params, repeats=repeats)
    finally:
        qwen3.causal_attention = blocked


def main(argv=None):
    from experiments import mini_repro as mr

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seqs", type=int, nargs="+", default=[512, 768, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    print(f"backend {jax.default_backend()}, {args.rows} rows; seconds (forward + backward), best of {args.repeats}")
    print("| what | tokens | one masked block | query blocks | ratio |\n|---|---|---|---|---|")
    for seq in args.seqs:
        one = attention_fwd_bwd(args.rows, seq, 4, 2, 32, seq, args.repeats)
        blocks = attention_fwd_bwd(args.rows, seq, 4, 2, 32, None, args.repeats)
        print(f"| attention, 4 heads (2 kv) x 32 | {seq} | {one:.3f} | {blocks:.3f} | {one / blocks:.2f}x |", flush=True)
    full = mr.PRESETS["full"]
    models = {f"dense d{h}, 4 layers": mr._dense(1024, h, 4) for h in full.student_hidden}
    models["MoE teacher d128, 4 layers"] = mr._teacher_config(full, 1024)
    for name, config in models.items():
        for seq in args.seqs:
            one = model_fwd_bwd(config, args.rows, seq, True, args.repeats)
            blocks = model_fwd_bwd(config, args.rows, seq, False, args.repeats)
            print(f"| {name} | {seq} | {one:.3f} | {blocks:.3f} | {one / blocks:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
