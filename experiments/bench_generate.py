"""Generation throughput: gopd_jax.generate vs transformers `generate` on the same checkpoint.

CPU default (a small Qwen3): `python -m experiments.bench_generate`
GPU (Qwen3-0.6B shapes, random weights, bf16):
    `python -m experiments.bench_generate --preset qwen3-0.6b --batch 64 256 --prompt 512 --new 128 --dtype bfloat16`
Prints new tokens/s for both, their ratio, and on GPU the HBM roofline for the shapes and our fraction of it.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from gopd_jax.generate import SamplingConfig, generate
from gopd_jax.models import QWEN3_0_6B, Qwen3Config, init_params, save_hf_checkpoint

SMALL = Qwen3Config(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64)
PRESETS = {"small": SMALL, "qwen3-0.6b": QWEN3_0_6B}
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}


def roofline_tokens_per_s(config: Qwen3Config, batch: int, prompt: int, new: int, dtype_bytes: int, bw: float):
    """Each decode step reads every weight once plus the KV cache up to the current length."""
    weights = config.num_params() * dtype_bytes
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype_bytes
    mean_len = prompt + new / 2
    step_bytes = weights + batch * mean_len * kv_per_token
    return batch / (step_bytes / bw)


def time_ours(params, config, prompts, lengths, new, repeats):
    sampling = SamplingConfig(max_new_tokens=new, temperature=0.0)
    out = generate(params, config, prompts, lengths, jax.random.key(0), sampling)
    jax.block_until_ready(out)  # compile
    best = float("inf")
    for r in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(generate(params, config, prompts, lengths, jax.random.key(r), sampling))
        best = min(best, time.perf_counter() - t0)
    return prompts.shape[0] * new / best


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
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args(argv)

    config = PRESETS[args.preset]
    dtype = getattr(jnp, args.dtype)
    params = init_params(config, jax.random.key(0), dtype)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}); preset {args.preset}; dtype {args.dtype}; "
          f"prompt {args.prompt}; new {args.new}")
    bw = next((v for k, v in HBM_BYTES_PER_S.items() if k in device.device_kind), None)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_transformers:
            save_hf_checkpoint(params, config, tmp)
        print("| batch | gopd_jax tok/s | transformers tok/s | ratio | roofline tok/s | % roofline |")
        print("|---|---|---|---|---|---|")
        for batch in args.batch:
            rng = np.random.default_rng(batch)
            prompts = jnp.asarray(rng.integers(1, config.vocab_size, (batch, args.prompt)), jnp.int32)
            lengths = jnp.full((batch,), args.prompt, jnp.int32)
            ours = time_ours(params, config, prompts, lengths, args.new, args.repeats)
            ref = float("nan") if args.skip_transformers else time_transformers(tmp, prompts, args.new,
                                                                                 args.repeats, args.dtype)
            roof = (roofline_tokens_per_s(config, batch, args.prompt, args.new, jnp.dtype(dtype).itemsize, bw)
                    if bw else float("nan"))
            print(f"| {batch} | {ours:,.0f} | {ref:,.0f} | {ours / ref:.1f}x | {roof:,.0f} | {100 * ours / roof:.0f}% |",
                  flush=True)


if __name__ == "__main__":
    main()
