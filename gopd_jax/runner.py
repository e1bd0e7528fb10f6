"""The experiment runner: method -> rollout -> batch -> score -> update -> log -> eval -> checkpoint.

Host side: environment workers and prompt assembly (gopd_jax.rollout). Device side: batched generation,
teacher scoring and the data-parallel update. Every method decision comes from the run's ``Method``
(gopd_jax.methods); the runner only composes. A killed run resumes from its last checkpoint: the task batch
and PRNG key of step s are functions of (seed, s), so the resumed run replays what the killed one would have.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import trange

from gopd_jax import batch as B
from gopd_jax import device_plan as dp
from gopd_jax import train
from gopd_jax.checkpointing import Checkpointer
from gopd_jax.envs import EnvPool, list_tasks
from gopd_jax.evaluate import eval_tasks, evaluate_policy
from gopd_jax.experiment import ExperimentConfig, check_resume, save_config
from gopd_jax.methods import Method, make_method
from gopd_jax.models import load_hf_checkpoint, save_hf_checkpoint
from gopd_jax.records import EXPERT, STUDENT, TEACHER, Policy
from gopd_jax.reporting import FINAL_EVAL, MetricsLogger, finished_run, logged_eval, write_final_eval, write_report
from gopd_jax.rollout import RolloutConfig, RolloutRunner, env_kwargs
from gopd_jax.scoring import check_compatible, score_batch
from gopd_jax.tokenizer import check_fits, load_tokenizer


def _rollout_record(episodes, trained) -> dict:
    """What the rollout did, for the step's training record."""
    results = [e.result for e in episodes]
    turns = [t for e in episodes for t in e.turns]
    # The student's own turns whose action the environment offered: where a drift into unfamiliar states shows
    # first (a malformed reply, invalid_action_frac, is rare once the reply format is learnt).
    student = [t.valid for t in turns if t.owner == STUDENT]
    return {
        "teacher_turn_frac": float(np.mean([t.owner == TEACHER for t in turns])) if turns else 0.0,
        "trained_turns": len(trained),
        "train_success": 100 * float(np.mean([r.won for r in results])),
        "train_score": float(np.mean([r.score for r in results])),
        "train_rounds": float(np.mean([r.rounds for r in results])),
        "truncated_frac": float(np.mean([r.truncated for r in results])),
        "invalid_action_frac": float(np.mean([t.action is None for t in turns])) if turns else 0.0,
        "student_valid_action_frac": float(np.mean(student)) if student else float("nan"),
        "env_failures": sum(r.env_failed for r in results),
    }


def run_experiment(cfg: ExperimentConfig) -> dict:
    """Train and evaluate one configuration (a finished run in cfg.out_dir is reused, a checkpointed one resumed);
    returns the final evaluation summary."""
    cfg.validate()
    method: Method = make_method(cfg)
    out = Path(cfg.out_dir)
    if (done := finished_run(cfg)) is not None:
        print(f"[{cfg.name}] already finished ({out / FINAL_EVAL}); nothing to do", flush=True)
        return done

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.student)
    compute_dtype = jnp.dtype(cfg.compute_dtype)
    params, s_config = load_hf_checkpoint(cfg.student, dtype=jnp.float32, on_host=True)  # float32 master weights
    # On the host first: a sharded teacher's weights go straight to their shards, never whole through device 0.
    t_params, t_config = load_hf_checkpoint(cfg.teacher, dtype=compute_dtype, on_host=True)
    teacher_tok = (load_tokenizer(cfg.teacher) if (Path(cfg.teacher) / "tokenizer_config.json").is_file()
                   and not cfg.tokenizer else None)
    check_compatible(s_config, t_config, tokenizer, teacher_tok)
    check_fits(tokenizer, s_config.vocab_size, cfg.tokenizer or cfg.student)
    n_dev = jax.local_device_count()
    plan = dp.make_plan(t_config, s_config, n_devices=n_dev, device_bytes=dp.device_memory_bytes(),
                        rollout_rows=B.bucket(min(cfg.num_workers, cfg.batch_tasks), 1),
                        max_prompt_tokens=cfg.max_prompt_tokens, max_new_tokens=cfg.max_new_tokens,
                        micro_batch_rows=cfg.micro_batch_rows, teacher_dtype=compute_dtype,
                        compute_dtype=compute_dtype, estimator=method.loss.estimator,
                        teacher_layout=cfg.teacher_layout, student_update=cfg.student_update)
    print(plan.describe(), flush=True)
    teacher = Policy(*dp.place_teacher(t_params, t_config, plan))  # expert parallel: its config names the mesh
    del t_params
    train_tasks = list_tasks(cfg.env, cfg.train_split, data_dir=cfg.data_dir or None)
    evaluation_tasks = eval_tasks(cfg)

    rows_per_call = n_dev * cfg.micro_batch_rows
    optimizer = train.make_optimizer(cfg.learning_rate, weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm)
    state = train.init_train_state(params, optimizer, jax.random.PRNGKey(cfg.seed))
    ckpt = Checkpointer(out / "checkpoints", max_to_keep=cfg.keep_checkpoints)
    start = 0
    if ckpt.latest_step() is not None:
        check_resume(ckpt.extra().get("config"), cfg, where=str(out / "checkpoints"))
        state, extra = ckpt.restore(state)  # shape-checked against this student
        start = extra["next_step"]
        print(f"[{cfg.name}] resumed from checkpoint at step {start}", flush=True)
    save_config(cfg, out)  # only now: a refused resume leaves the old run's config in place
    print(f"[{cfg.name}] {cfg.method}: config in {out / 'config.json'}", flush=True)
    exact = method.loss.estimator == "exact"  # the teacher's hidden states are made per micro-batch on device
    loss_fn = train.with_compute_dtype(functools.partial(
        train.distill_loss_fn, config=s_config, loss_config=method.loss,
        teacher_config=teacher.config if exact else None), compute_dtype)
    loss_kw = {"teacher_params": teacher.params} if exact else {}
    if plan.student_update == "fsdp":
        mesh = plan.mesh("data")
        state = train.fsdp_shard(state, mesh)
        build = functools.partial(train.fsdp_update_step, loss_fn, optimizer, mesh)
        metrics_of, to_host = (lambda m: m), jax.device_get
    else:
        mesh = None
        state = train.replicate(state)
        build = functools.partial(train.pmap_update_step, loss_fn, optimizer)
        metrics_of, to_host = train.unreplicate, train.unreplicate
    updates = {}  # accumulation steps -> compiled update step

    def student_policy():
        return Policy(train.policy_params(state.params, compute_dtype, mesh), s_config)

    def update(state, part, beta):
        accum = part["tokens"].shape[0] // rows_per_call
        if accum not in updates:
            updates[accum] = build(accum_steps=accum)
        weighted = B.normalise_masks(part, n_dev * accum, cfg.aggregation)
        state, metrics = updates[accum](state, train.shard_batch(weighted, n_dev), beta=jnp.float32(beta), **loss_kw)
        return state, metrics_of(metrics)

    logger = MetricsLogger(out, resume_from=start)
    base_key = jax.random.PRNGKey(cfg.seed)
    skips = 0  # consecutive non-finite steps
    # Task ids carry the data path, so workers need no data_dir.
    with EnvPool(cfg.env, env_kwargs(cfg.env, method.expert_plays, cfg.expert), num_workers=cfg.num_workers) as pool:
        runner = RolloutRunner(pool, tokenizer, RolloutConfig.from_experiment(cfg))
        eval_runner = RolloutRunner(pool, tokenizer, RolloutConfig.from_experiment(cfg, evaluation=True))
        turn_limit = runner.config.turn_limit

        def evaluate(step):
            summary, _ = evaluate_policy(eval_runner, evaluation_tasks, student_policy(),
                                         jax.random.fold_in(base_key, 10_000_000 + step), cfg.progress)
            logger.log_eval(step, summary)
            return summary

        for step in trange(start, cfg.steps, desc=cfg.name, disable=not cfg.progress, initial=start,
                           total=cfg.steps):
            t0 = time.perf_counter()
            beta = method.beta(step)
            rng = np.random.default_rng([cfg.seed, step])
            tasks = [train_tasks[i] for i in rng.choice(len(train_tasks), cfg.batch_tasks,
                                                        replace=len(train_tasks) < cfg.batch_tasks)]
            student = student_policy()
            policies = ({STUDENT: EXPERT, TEACHER: EXPERT} if method.expert_plays else
                        {STUDENT: student, TEACHER: teacher})
            episodes, rstats = method.play(runner, tasks, policies, jax.random.fold_in(base_key, step), step)
            trained = [t for e in episodes for t in e.turns if t.owner in method.trained_owners]
            record = {"step": step, "beta": beta, **method.log(step), **_rollout_record(episodes, trained)}
            if not trained:  # e.g. every environment died at reset: nothing to learn from; logged, not trained on
                logger.log_train({**record, "skipped": 1.0, "kl_by_turn": [None] * turn_limit})
                continue
            batch = B.training_batch(trained, pad_id=tokenizer.pad_token_id or 0, row_multiple=rows_per_call)
            batch = score_batch(batch, teacher, student, rows_per_call, method.loss)
            parts_rng = np.random.default_rng([cfg.seed, step, 1])
            metrics = []
            for _ in range(cfg.ppo_epochs):
                for part in B.mini_batches(batch, len(trained), cfg.mini_batches, rows_per_call, parts_rng):
                    state, m = update(state, part, beta)
                    metrics.append(m)
            record.update(train.merge_metrics(metrics))
            record.update({
                "updates": len(metrics),
                "n_student_tokens": float(batch["student_mask"].sum()),
                "n_teacher_tokens": float(batch["teacher_mask"].sum()),
                "env_wait_frac": rstats["env_wait_s"] / max(rstats["wall_s"], 1e-9),
                "generate_s": rstats["generate_s"], "rollout_s": rstats["wall_s"],
                "step_s": time.perf_counter() - t0,
                "kl_by_turn": B.kl_by_turn(trained, batch, turn_limit),
            })
            logger.log_train(record)
            skips = train.count_skips(skips, record["skipped"])
            done = step + 1 == cfg.steps
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not done:
                evaluate(step + 1)
            if done or (step + 1) % cfg.checkpoint_every == 0:
                ckpt.save(step + 1, to_host(state), {"next_step": step + 1, "beta": beta, "config": cfg.to_json()})
        # A run killed after logging its final evaluation reuses it rather than logging a second one.
        final = (logged_eval(out, cfg.steps) if start == cfg.steps else None) or evaluate(cfg.steps)
    ckpt.close()
    logger.close()
    # The trained student leaves in the format it came in: a Hugging Face checkpoint directory.
    save_hf_checkpoint(to_host(state.params), s_config, out / "final_model")
    tokenizer.save_pretrained(out / "final_model")
    write_report(out, cfg.name)
    write_final_eval(out, final)  # last: marks the run finished
    return final
