"""Memory and CPU time of the distillation losses at the Qwen3 vocabulary (151,936).

Compares value_and_grad (w.r.t. student hidden states and head) of
  sampled  the paper's estimator (chunked student log-probs only),
  exact    the chunked full-vocabulary reverse/forward KL (student and teacher logits per chunk),
  naive    the same exact KL with whole [B, T, V] logits for both models (what chunking avoids).
Memory is XLA's compile-time temp allocation (``memory_analysis()``), which works on CPU.

    JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache .venv/bin/python -m experiments.bench_losses

``--host-memory`` instead compares where the exact estimator's teacher hidden states live, each path in a fresh
process: "host" (the teacher's hidden states for the whole batch gathered as float32 on the host, then fed to the
update) vs "device" (the update step runs the teacher per micro-batch: `distill_loss_fn(teacher_params=...)`).
It prints the peak of host allocations (tracemalloc, which numpy reports to) and the process's peak RSS.

    .venv/bin/python -m experiments.bench_losses --host-memory --rows 64 --seq 512
"""
import argparse
import functools
import json
import resource
import subprocess
import sys
import time
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
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


def exact_update_host_memory(where: str, rows: int, seq: int, micro_rows: int) -> dict:
    """One exact-estimator update of a small student against a small teacher (D 512, vocab 4096), with the
    teacher's hidden states made on the host for the whole batch ("host") or inside the step ("device")."""
    from gopd_jax import scoring, train
    from gopd_jax.models import Qwen3Config, forward_hidden, init_params, output_head

    student = Qwen3Config(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    teacher = Qwen3Config(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 4096, (rows, seq)).astype(np.int32)
    mask = np.zeros((rows, seq), np.float32)
    mask[:, seq // 2:-1] = 1.0
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "student_mask": mask,
             "teacher_mask": np.zeros_like(mask), "old_logprobs": np.zeros_like(mask),
             "teacher_logprobs": np.zeros_like(mask)}
    t_params = init_params(teacher, jax.random.PRNGKey(1))
    optimizer = train.make_optimizer(1e-6)
    state = train.init_train_state(init_params(student, jax.random.PRNGKey(0)), optimizer, jax.random.PRNGKey(2))
    cfg = L.LossConfig(estimator="exact")
    device_loss = functools.partial(train.distill_loss_fn, config=student, loss_config=cfg, teacher_config=teacher)

    def host_loss(params, batch, beta, teacher_head):  # the earlier runner: hidden states arrive in the batch
        return L.distill_loss(forward_hidden(params, student, batch["tokens"]), output_head(params, student), batch,
                              beta, cfg, teacher_hidden=batch["teacher_hidden"], teacher_head=teacher_head)

    step = train.jit_update_step(host_loss if where == "host" else device_loss, optimizer,
                                 accum_steps=rows // micro_rows)
    tracemalloc.start()
    start = time.perf_counter()
    if where == "host":  # float32 hidden states of every row, gathered on the host
        batch["teacher_hidden"] = np.concatenate([
            np.asarray(scoring.teacher_hidden(t_params, teacher, jnp.asarray(tokens[i:i + micro_rows])), np.float32)
            for i in range(0, rows, micro_rows)])
        kw = {"teacher_head": output_head(t_params, teacher)}
    else:
        kw = {"teacher_params": t_params}
    state, metrics = jax.block_until_ready(step(state, batch, beta=jnp.float32(0.0), **kw))
    _, peak = tracemalloc.get_traced_memory()
    return {"where": where, "host_peak_mib": peak / 2**20, "max_rss_mib": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 2**10, "seconds": time.perf_counter() - start,
        "loss": float(metrics["loss"]), "hidden_mib": rows * seq * teacher.hidden_size * 4 / 2**20}


def host_memory_report(rows: int, seq: int, micro_rows: int) -> None:
    results = []
    for where in ("host", "device"):  # a fresh process each, so peak RSS belongs to one path
        out = subprocess.run([sys.executable, "-m", "experiments.bench_losses", "--host-memory-path", where,
                              "--rows", str(rows), "--seq", str(seq), "--micro-rows", str(micro_rows)],
                             check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"exact estimator, one update: {rows} rows x {seq} tokens, micro-batches of {micro_rows} rows, teacher D 512 "
          f"(its float32 hidden states for the batch: {results[0]['hidden_mib']:.0f} MiB)")
    print("| teacher hidden states | host peak (tracemalloc) MiB | process peak RSS MiB | seconds | loss |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['where']} | {r['host_peak_mib']:.1f} | {r['max_rss_mib']:.0f} | {r['seconds']:.1f} | {r['loss']:.4f} |")
    paper = 64 * 30 * 10_752 * 2048 * 4
    print(f"at paper scale (64 tasks x 30 turns, 10,752-token rows, Qwen3-30B-A3B D 2048) the host path would hold "
          f"{paper / 2**30:,.0f} GiB; the device path holds one micro-batch's hidden states on the device")


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=L.DEFAULT_CHUNK)
    parser.add_argument("--shapes", default="1x256,1x512,2x1024", help="BxT list")
    parser.add_argument("--time-shapes", default="1x256", help="BxT list also run and timed (best of 2)")
    parser.add_argument("--host-memory", action="store_true", help="exact estimator: host vs device teacher states")
    parser.add_argument("--host-memory-path", choices=("host", "device"), help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--micro-rows", type=int, default=8)
    args = parser.parse_args(argv)
    if args.host_memory_path:
        print(json.dumps(exact_update_host_memory(args.host_memory_path, args.rows, args.seq, args.micro_rows)))
        return
    if args.host_memory:
        host_memory_report(args.rows, args.seq, args.micro_rows)
        return

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
