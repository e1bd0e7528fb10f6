"""The cost of one Guided-OPD training step at the paper's shapes: rollout (teacher- and student-owned turns)
-> teacher scoring -> update, with the real Qwen3 tokenizer, random weights and recorded ALFWorld episodes
replayed (`alfworld_replay_bench`, a benchmark tool: see gopd_jax/envs/replay.py).

Prints the device plan, then per step the seconds of teacher generation, student generation, environment wait,
other rollout host work (prompts, tokenization), scoring and update, and the projected time of the paper's 250
steps (first step excluded: it compiles). Random weights never write a valid <action>, so episodes run the full
turn limit (the worst case) and the environment is only reset, never stepped: the line "env if every turn
acted" adds the recorded engine time for that case.

    # paper shapes on one GPU (teacher layers reduced to fit; the projection scales teacher time per layer)
    python -m experiments.bench_step --teacher qwen3-30b-a3b --teacher-layers 12 --student qwen3-0.6b
    # CI smoke (tiny models, real tokenizer): see tests/test_bench_step.py
    python -m experiments.bench_step --teacher tiny --student tiny --tasks 4 --workers 2 --max-turns 2 \\
        --max-new-tokens 8 --steps 2 --no-realtime
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import lzma
import shutil
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gopd_jax import curriculum as cur
from gopd_jax import device_plan as dp
from gopd_jax import train
from gopd_jax.batch import bucket, pad_rows, training_batch
from gopd_jax.envs import EnvPool, list_tasks
from gopd_jax.envs.replay import find_recording, load_recording
from gopd_jax.losses import LossConfig
from gopd_jax.methods import owners_from_beta
from gopd_jax.models import QWEN3_0_6B, QWEN3_1_7B, QWEN3_4B, QWEN3_30B_A3B, Qwen3Config, init_params
from gopd_jax.records import STUDENT, TEACHER, Policy
from gopd_jax.rollout import RolloutConfig, RolloutRunner
from gopd_jax.scoring import score_batch
from gopd_jax.tokenizer import load_tokenizer

PAPER_STEPS = 250
TINY = Qwen3Config(vocab_size=151_936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8)
TINY_MOE = dataclasses.replace(TINY, tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2,
                               moe_intermediate_size=16)
STUDENTS = {"tiny": TINY, "qwen3-0.6b": QWEN3_0_6B, "qwen3-1.7b": QWEN3_1_7B, "qwen3-4b": QWEN3_4B}
TEACHERS = {**STUDENTS, "tiny": TINY_MOE, "qwen3-30b-a3b": QWEN3_30B_A3B}
_TOKENIZER = Path("shared/data/qwen3_tokenizer")


def qwen3_tokenizer(path: str | None = None, cache: Path = Path.home() / ".cache" / "gopd_jax" / "qwen3_tokenizer"):
    """The real Qwen3 tokenizer: `path` (a folder with tokenizer.json or tokenizer.json.xz), else the project's
    shared data folder above this file or the working directory; an .xz file is unpacked into `cache` once."""
    candidates = [Path(path)] if path else [p / _TOKENIZER for base in (Path.cwd(), Path(__file__).resolve())
                                            for p in (base, *base.parents)]
    src = next((p for p in candidates if (p / "tokenizer_config.json").is_file()), None)
    if src is None:
        raise FileNotFoundError("no Qwen3 tokenizer folder found; pass --tokenizer DIR (tokenizer.json[.xz] + "
                                "tokenizer_config.json, as shipped with every Qwen3 checkpoint)")
    if (src / "tokenizer.json").is_file():
        return load_tokenizer(src)
    if not (cache / "tokenizer.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / "tokenizer.json.partial"
        with lzma.open(src / "tokenizer.json.xz") as f, open(tmp, "wb") as out:
            shutil.copyfileobj(f, out)
        shutil.copy(src / "tokenizer_config.json", cache / "tokenizer_config.json")
        tmp.rename(cache / "tokenizer.json")  # complete or absent, never half-written
    return load_tokenizer(cache)


class TimedRunner(RolloutRunner):
    """RolloutRunner that also times generation per owner (generate returns host arrays: timing is exact)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seconds = {STUDENT: 0.0, TEACHER: 0.0}
        self.owner_of: dict[int, str] = {}

    def _generate(self, policy, prompts, keys, episodes):
        t0 = time.perf_counter()
        out = super()._generate(policy, prompts, keys, episodes)
        self.seconds[self.owner_of[id(policy)]] += time.perf_counter() - t0
        return out


def projected_paper_seconds(step: dict, beta: float, turn_scale: float = 1.0, teacher_scale: float = 1.0,
                            steps: int = PAPER_STEPS, rho: float = 0.8) -> float:
    """The paper's 250 steps under the cosine curriculum, from one measured step: teacher and student generation
    scale with their share of turns (beta_s vs the measured beta); everything scales linearly by `turn_scale`
    (turns per step in the paper / turns measured) and the teacher's parts (its generation, scoring) by
    `teacher_scale` (full layers / layers run)."""
    betas = np.asarray(cur.beta_at(cur.cosine_to_zero(steps, rho), np.arange(steps)), np.float64)
    fixed = step["total"] - step["teacher_gen"] - step["student_gen"] + (teacher_scale - 1) * step["scoring"]
    t_per = teacher_scale * step["teacher_gen"] / beta if beta > 0 else 0.0
    s_per = step["student_gen"] / (1 - beta) if beta < 1 else 0.0
    return float(turn_scale * np.sum(fixed + betas * t_per + (1 - betas) * s_per))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", choices=sorted(TEACHERS), default="qwen3-30b-a3b")
    ap.add_argument("--student", choices=sorted(STUDENTS), default="qwen3-0.6b")
    ap.add_argument("--teacher-layers", type=int, default=0, help="reduce the teacher's layers (0: all)")
    ap.add_argument("--student-layers", type=int, default=0, help="reduce the student's layers (0: all)")
    ap.add_argument("--tasks", type=int, default=64, help="tasks per step (paper: 64)")
    ap.add_argument("--workers", type=int, default=8, help="env workers = episodes generating at once")
    ap.add_argument("--max-turns", type=int, default=30)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--max-prompt-tokens", type=int, default=10_240)
    ap.add_argument("--micro-batch-rows", type=int, default=1)
    ap.add_argument("--beta", type=float, default=0.4, help="teacher turn share (0.4: the cosine curriculum's mean)")
    ap.add_argument("--estimator", choices=("sampled", "exact"), default="sampled")
    ap.add_argument("--teacher-layout", choices=dp.TEACHER_LAYOUTS, default="auto")
    ap.add_argument("--student-update", choices=dp.STUDENT_UPDATES, default="auto")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--dtype", default=None, help="teacher / student compute dtype (default bf16, f32 on CPU)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--paper-turns", type=int, default=64 * 30,
                    help="turns per paper step for the projection (64 tasks x 30 turns; random weights use every turn)")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--recording", default=None, help="alfworld_replay_bench recording (default: the committed one)")
    ap.add_argument("--no-realtime", action="store_true", help="replay without the engine's recorded latency")
    args = ap.parse_args(argv)

    dtype = jnp.dtype(args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16"))
    t_cfg, s_cfg = TEACHERS[args.teacher], STUDENTS[args.student]
    if args.teacher_layers:
        t_cfg = dataclasses.replace(t_cfg, num_hidden_layers=args.teacher_layers)
    if args.student_layers:
        s_cfg = dataclasses.replace(s_cfg, num_hidden_layers=args.student_layers)
    tokenizer = qwen3_tokenizer(args.tokenizer)
    n_dev = jax.local_device_count()
    rows = bucket(min(args.workers, args.tasks), 1)  # RolloutRunner's generation rows
    plan = dp.make_plan(t_cfg, s_cfg, n_devices=n_dev, device_bytes=dp.device_memory_bytes(), rollout_rows=rows,
                        max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                        micro_batch_rows=args.micro_batch_rows, teacher_dtype=dtype, compute_dtype=dtype,
                        estimator=args.estimator, teacher_layout=args.teacher_layout,
                        student_update=args.student_update, remat=args.remat)
    print(f"device {jax.devices()[0].device_kind} x {n_dev}; teacher {args.teacher} ({t_cfg.num_hidden_layers} "
          f"layers), student {args.student} ({s_cfg.num_hidden_layers} layers), {dtype.name}, tokenizer "
          f"{len(tokenizer)} tokens\n{plan.describe()}", flush=True)

    teacher = Policy(*dp.place_teacher(init_params(t_cfg, jax.random.PRNGKey(1), dtype), t_cfg, plan))
    optimizer = train.make_optimizer(1e-6)
    state = train.init_train_state(init_params(s_cfg, jax.random.PRNGKey(0)), optimizer, jax.random.PRNGKey(2))
    loss_cfg = LossConfig(estimator=args.estimator)
    loss_fn = functools.partial(train.distill_loss_fn, config=s_cfg, loss_config=loss_cfg, remat=args.remat,
                                teacher_config=teacher.config if args.estimator == "exact" else None)
    loss_fn = train.with_compute_dtype(loss_fn, dtype)
    if plan.student_update == "fsdp":
        mesh = plan.mesh("data")
        state = train.fsdp_shard(state, mesh)
        update = train.fsdp_update_step(loss_fn, optimizer, mesh)
    else:
        mesh, state = None, train.replicate(state)
        update = train.pmap_update_step(loss_fn, optimizer)

    recording = find_recording(args.recording)
    tasks = list_tasks("alfworld_replay_bench", "valid_unseen", data_dir=str(recording))
    step_s = statistics.median(s["seconds"] for g in load_recording(str(recording.resolve())) for s in g["states"][1:])
    rollout_cfg = RolloutConfig(env="alfworld", max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                                max_prompt_tokens=args.max_prompt_tokens)
    results = []
    with EnvPool("alfworld_replay_bench", {"realtime": not args.no_realtime}, num_workers=args.workers) as pool:
        runner = TimedRunner(pool, tokenizer, rollout_cfg)
        for step in range(args.steps):
            t0 = time.perf_counter()
            student = Policy(train.policy_params(state.params, dtype, mesh), s_cfg)
            policies = {STUDENT: student, TEACHER: teacher}
            runner.owner_of = {id(p): owner for owner, p in policies.items()}
            runner.seconds = {STUDENT: 0.0, TEACHER: 0.0}
            batch_tasks = [tasks[(step * args.tasks + i) % len(tasks)] for i in range(args.tasks)]
            episodes, stats = runner.run(batch_tasks, policies, owners_from_beta(args.beta),
                                         jax.random.PRNGKey(step), progress=False)
            turns = [t for e in episodes for t in e.turns]
            t1 = time.perf_counter()
            batch = training_batch(turns, pad_id=tokenizer.pad_token_id or 0)
            batch = pad_rows(batch, bucket(len(batch["tokens"]), n_dev * args.micro_batch_rows))
            if args.estimator == "sampled":  # the exact estimator runs the teacher inside the update instead
                batch = score_batch(batch, teacher, student, n_dev * args.micro_batch_rows, loss_cfg)
            t2 = time.perf_counter()
            kw = {"beta": jnp.float32(args.beta)}
            if args.estimator == "exact":
                kw["teacher_params"] = teacher.params
            state, metrics = update(state, train.shard_batch(batch, n_dev), **kw)
            loss = float(np.asarray(metrics["loss"]).reshape(-1)[0])
            t3 = time.perf_counter()
            r = {"teacher_gen": runner.seconds[TEACHER], "student_gen": runner.seconds[STUDENT],
                 "env_wait": stats["env_wait_s"], "scoring": t2 - t1, "update": t3 - t2, "total": t3 - t0,
                 "turns": len(turns), "tokens": int(batch["tokens"].shape[0] * batch["tokens"].shape[1]),
                 "width": int(batch["tokens"].shape[1]), "loss": loss}
            r["rollout_other"] = t1 - t0 - r["teacher_gen"] - r["student_gen"] - r["env_wait"]
            results.append(r)
            print(f"step {step}{' (compiles)' if step == 0 else ''}: " + ", ".join(
                f"{k} {r[k]:.2f} s" for k in ("teacher_gen", "student_gen", "env_wait", "rollout_other", "scoring",
                                             "update", "total"))
                  + f"; {r['turns']} turns, batch {len(batch['tokens'])} x {r['width']}, loss {loss:.4f}", flush=True)
    last = results[-1]
    env_if_acting = last["turns"] * step_s / args.workers
    turn_scale = args.paper_turns / last["turns"]
    teacher_scale = TEACHERS[args.teacher].num_hidden_layers / t_cfg.num_hidden_layers
    projected = projected_paper_seconds(last, args.beta, turn_scale, teacher_scale)
    print(f"env if every turn acted: + ~{env_if_acting:.1f} s per step (recorded median engine step {step_s * 1e3:.0f} "
          f"ms x {last['turns']} turns / {args.workers} workers, when not hidden behind generation)")
    print(f"projected {PAPER_STEPS} steps (cosine curriculum, from the last step; x{turn_scale:.1f} turns, teacher "
          f"x{teacher_scale:.1f} layers, scaled linearly): {projected / 3600:.2f} h")
    return {"steps": results, "projected_s": projected, "plan": plan}


if __name__ == "__main__":
    main()
