"""Memory and CPU time of the distillation losses at the Qwen3 vocabulary (151,936).

Compares value_and_grad (w.r.t. student hidden states and head) of
  sampled  the paper's estimator (chunked student log-probs only),
  exact    the chunked full-vocabulary reverse/forward KL (student and teacher logits per chunk),
  naive    the same exact KL with whole [B, T, V] logits for both models (what chunking avoids).
Memory is XLA's compile-time temp allocation (``memory_analysis()``), which works on CPU.

    JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache .venv/bin/python -m experiments.bench_losses
"""
import argparse
import time

import jax
import jax.numpy as jnp
from gopd_jax import losses as L

GIB = 2.0 ** 30


def naive_exact_loss(hidden, head, batch, beta, teacher_hidden, teacher_head):
    """Unchunked default exact loss (token_mean): materialises both [B, T, V] logit tensors."""
    stats = L.token_stats(hidden @ head, batch["targets"], teacher_hidden @ teacher_head)
    sm, tm = batch["student_mask"], batch["teacher_mask"]
    ls = jnp.sum(stats["reverse_kl"] * sm) / jnp.maximum(jnp.sum(sm), 1.0)
    lt = jnp.sum(stats["forward_kl"] * tm) / jnp.maximum(jnp.sum(tm), 1.0)
    return (1.0 - beta) * ls + beta * lt, {}


def make_inputs(b, t, d, v, key):
    ks = jax.random.split(key, 6)
    hidden = jax.random.normal(ks[0], (b, t, d), jnp.float32)
    head = jax.random.normal(ks[1], (d, v), jnp.float32) * d ** -0.5
    teacher_hidden = jax.random.normal(ks[2], (b, t, d), jnp.float32)
    teacher_head = jax.random.normal(ks[3], (d, v), jnp.float32) * d ** -0.5
    owner = jax.random.uniform(ks[4], (b, t))
    targets = jax.random.randint(ks[5], (b, t), 0, v)
    batch = {
        "targets": targets,
        "student_mask": (owner < 0.6).astype(jnp.float32),
        "teacher_mask": ((owner >= 0.6) & (owner < 0.9)).astype(jnp.float32),
        "old_logprobs": jnp.full((b, t), -2.0, jnp.float32),
        "teacher_logprobs": jnp.full((b, t), -2.5, jnp.float32),
    }
    return hidden, head, batch, teacher_hidden, teacher_head


def compiled_grad(loss_fn, args):
    def f(hidden, head, batch, teacher_hidden, teacher_head):
        return jax.value_and_grad(lambda h, w: loss_fn(h, w, batch, 0.3, teacher_hidden, teacher_head)[0],
                                  argnums=(0, 1))(hidden, head)
    return jax.jit(f).lower(*args).compile()


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=L.DEFAULT_CHUNK)
    parser.add_argument("--shapes", default="1x256,1x512,2x1024", help="BxT list")
    parser.add_argument("--time-shapes", default="1x256", help="BxT list also run and timed (best of 2)")
    args = parser.parse_args(argv)

    variants = {
        "sampled": lambda h, w, b, beta, th, tw: L.distill_loss(h, w, b, beta, L.LossConfig(chunk=args.chunk)),
        "exact": lambda h, w, b, beta, th, tw: L.distill_loss(
            h, w, b, beta, L.LossConfig(estimator="exact", chunk=args.chunk), th, tw),
        "naive": naive_exact_loss,
    }
    print(f"vocab {args.vocab}, D {args.dim}, chunk {args.chunk}, float32, devices {jax.devices()}")
    print("temp = XLA temp buffers of value_and_grad; outputs (grads of hidden and head) are extra: "
          f"{(args.dim * args.vocab * 4) / GIB:.2f} GiB for the head")
    print(f"{'B x T':>8} {'variant':>8} {'temp GiB':>9} {'vs sampled':>10} {'time s':>7}")
    for shape in args.shapes.split(","):
        b, t = map(int, shape.split("x"))
        inputs = make_inputs(b, t, args.dim, args.vocab, jax.random.PRNGKey(0))
        temps = {}
        for name, fn in variants.items():
            compiled = compiled_grad(fn, inputs)
            temps[name] = compiled.memory_analysis().temp_size_in_bytes
            seconds = ""
            if shape in args.time_shapes.split(","):
                runs = []
                for _ in range(2):  # the first run also pays for page-faulting fresh GiB buffers
                    start = time.perf_counter()
                    loss, grads = jax.block_until_ready(compiled(*inputs))
                    runs.append(time.perf_counter() - start)
                    assert bool(L.is_finite(loss, grads))
                seconds = f"{min(runs):7.2f}"
            print(f"{shape:>8} {name:>8} {temps[name] / GIB:9.3f} {temps[name] / temps['sampled']:10.2f} {seconds:>7}",
                  flush=True)


if __name__ == "__main__":
    main()
