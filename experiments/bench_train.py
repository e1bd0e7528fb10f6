"""Update-step throughput: SFT loss + AdamW on random tokens, single device (jit_update_step).

    JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache .venv/bin/python -m experiments.bench_train     # small CPU config
    python -m experiments.bench_train --preset qwen3-0.6b --seq 2048 --batch 8               # GPU: step time, MFU
    python -m experiments.bench_train --preset qwen3-0.6b --seq 2048 --batch 8 --attention cudnn --remat dots

MFU = model FLOPs per step / step time / peak, with model FLOPs = 6 * params * tokens (forward + backward of
every matmul, tied head included) + 12 * layers * heads * head_dim * seq * tokens (attention scores and
values, counted without the causal saving, as in PaLM); recomputation under --remat is not model FLOPs.
--attention picks the training attention (xla: blocked, any backend; cudnn: cuDNN flash attention, GPU) and
--remat what each layer saves for the backward pass (gopd_jax.models.qwen3.REMAT_POLICIES). Params are float32 masters; --compute-dtype casts
them for the forward/backward (bf16 on GPU).
"""
import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from gopd_jax import train
from gopd_jax.models import QWEN3_0_6B, QWEN3_1_7B, QWEN3_4B, Qwen3Config, init_params
from gopd_jax.models.qwen3 import REMAT_POLICIES, TRAIN_ATTENTION

PRESETS = {"qwen3-0.6b": QWEN3_0_6B, "qwen3-1.7b": QWEN3_1_7B, "qwen3-4b": QWEN3_4B}


def model_flops_per_step(config: Qwen3Config, batch: int, seq: int) -> float:
    tokens = batch * seq
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq
    return (6 * config.num_params() + attention) * tokens


def random_batch(config: Qwen3Config, batch: int, seq: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, config.vocab_size, (batch, seq)).astype(np.int32)
    targets = np.concatenate([tokens[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
    return {"tokens": tokens, "targets": targets, "loss_mask": np.ones((batch, seq), np.float32)}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", choices=sorted(PRESETS), help="published shapes (default: a small config)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--accum", type=int, default=1, help="gradient accumulation micro-batches")
    parser.add_argument("--chunk", type=int, default=128, help="time steps per logits chunk in the loss")
    parser.add_argument("--compute-dtype", default=None, help="e.g. bfloat16 (default: bf16 on GPU, f32 on CPU)")
    parser.add_argument("--attention", choices=TRAIN_ATTENTION, default="xla")
    parser.add_argument("--remat", choices=sorted(REMAT_POLICIES), default="none")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--profile", default=None, help="write a jax.profiler trace of the timed steps to this folder")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="H100 dense bf16")
    args = parser.parse_args(argv)

    config = PRESETS[args.preset] if args.preset else Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=3 * args.dim,
        num_hidden_layers=args.layers, num_attention_heads=max(args.dim // 64, 1),
        num_key_value_heads=max(args.dim // 128, 1), head_dim=64)
    on_cpu = jax.default_backend() == "cpu"
    compute_dtype = jnp.dtype(args.compute_dtype or ("float32" if on_cpu else "bfloat16"))

    loss_fn = functools.partial(train.sft_loss_fn, config=config, chunk=args.chunk, attention=args.attention,
                                remat=args.remat)
    if compute_dtype != jnp.float32:
        loss_fn = train.with_compute_dtype(loss_fn, compute_dtype)
    optimizer = train.make_optimizer(1e-6)
    state = train.init_train_state(init_params(config, jax.random.PRNGKey(0)), optimizer, jax.random.PRNGKey(1))
    step = train.jit_update_step(loss_fn, optimizer, accum_steps=args.accum)
    batch = jax.device_put(random_batch(config, args.batch, args.seq))

    print(f"device {jax.devices()[0].device_kind} ({jax.default_backend()}), params {config.num_params() / 1e6:.1f}M, "
          f"layers {config.num_hidden_layers}, d {config.hidden_size}, vocab {config.vocab_size}, "
          f"batch {args.batch} x seq {args.seq}, accum {args.accum}, compute {compute_dtype.name}, attention "
          f"{args.attention}, remat {args.remat}", flush=True)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    temp = f", temp {memory.temp_size_in_bytes / 2**30:.2f} GiB" if memory is not None else ""
    state, metrics = jax.block_until_ready(compiled(state, batch))  # warm-up
    print(f"compile + first step {time.perf_counter() - start:.1f} s{temp}, loss {float(metrics['loss']):.4f}",
          flush=True)

    if args.profile:
        jax.profiler.start_trace(args.profile)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    seconds = (time.perf_counter() - start) / args.steps
    if args.profile:
        jax.profiler.stop_trace()
    tokens = args.batch * args.seq
    tflops = model_flops_per_step(config, args.batch, args.seq) / seconds / 1e12
    print(f"step {seconds:.3f} s, {tokens / seconds:,.0f} tokens/s, {tflops:.2f} model TFLOP/s, "
          f"MFU {100 * tflops / args.peak_tflops:.1f}% of {args.peak_tflops:g} TFLOP/s "
          f"(loss {float(metrics['loss']):.4f}, skipped {float(metrics['skipped']):.0f})")


if __name__ == "__main__":
    main()
