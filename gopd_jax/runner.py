"""The experiment runner: rollout -> teacher scoring -> pmap update -> logging -> evaluation -> checkpoint.

Host side: environment workers and prompt assembly (gopd_jax.rollout). Device side: batched generation,
teacher scoring and the data-parallel update. A killed run resumes from its last checkpoint: the task batch
and PRNG key of step s are functions of (seed, s), so the resumed run replays exactly what the killed one
would have done.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import trange

from gopd_jax import curriculum as cur
from gopd_jax.checkpointing import Checkpointer
from gopd_jax.envs import EnvPool, list_tasks
from gopd_jax.evaluate import EpisodeResult, summarize
from gopd_jax.experiment import ExperimentConfig, save_config
from gopd_jax.losses import LossConfig
from gopd_jax.models import load_hf_checkpoint, output_head, save_hf_checkpoint
from gopd_jax.reporting import MetricsLogger, write_report
from gopd_jax.rollout import (EXPERT, STUDENT, TEACHER, Episode, Policy, RolloutConfig, RolloutRunner,
                              owners_from_beta, owners_student_first, training_batch)
from gopd_jax.scoring import check_compatible, teacher_hidden, teacher_logprobs
from gopd_jax.tokenizer import load_tokenizer
from gopd_jax.train import (distill_loss_fn, init_train_state, make_optimizer, pmap_update_step, replicate,
                            shard_batch, unreplicate, with_compute_dtype)


def make_curriculum(cfg: ExperimentConfig):
    """beta(step) for the method: Guided-OPD's curriculum, 0 for vanilla OPD, a fixed beta, 1 for SFT."""
    if cfg.method == "opd":
        return cur.constant(0.0)
    if cfg.method == "sft":
        return cur.constant(1.0)
    if cfg.method == "fixed_beta" or cfg.curriculum == "constant":
        return cur.constant(cfg.beta)
    return {"cosine": cur.cosine_to_zero, "linear": cur.linear_to_zero}[cfg.curriculum](cfg.steps, cfg.rho)


def env_kwargs(cfg: ExperimentConfig, expert: bool) -> dict:
    """ScienceWorld computes gold paths at every reset (up to ~30 s on some tasks): only when the expert plays."""
    return {"gold_path": expert} if cfg.env == "scienceworld" else {}


def rollout_config(cfg: ExperimentConfig, evaluation: bool = False) -> RolloutConfig:
    return RolloutConfig(env=cfg.env, max_turns=cfg.max_turns or None, max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.eval_temperature if evaluation else cfg.temperature,
                         k_history=cfg.k_history, think=cfg.think, max_prompt_tokens=cfg.max_prompt_tokens)


def success_by_turn(results: list[EpisodeResult], max_turns: int) -> list[float]:
    """Fraction of episodes won within t turns, t = 1..max_turns."""
    return [float(np.mean([r.won and r.rounds <= t for r in results])) for t in range(1, max_turns + 1)]


def evaluate_policy(runner: RolloutRunner, tasks, policy, key, progress: bool = True) -> tuple[dict, list[Episode]]:
    """Score a policy alone (beta = 0): Score / Success Rate / Rounds, per task type, success by turn."""
    episodes, stats = runner.run(tasks, {STUDENT: policy, TEACHER: policy}, owners_from_beta(0.0), key,
                                 progress=progress, desc="eval")
    results = [e.result for e in episodes]
    summary = summarize(results)
    summary["success_by_turn"] = success_by_turn(results, runner.config.turn_limit)
    summary["rollout"] = stats
    return summary, episodes


def evaluate_checkpoint(cfg: ExperimentConfig, checkpoint: str) -> dict:
    """Evaluate one Hugging Face checkpoint alone on cfg's eval split with cfg's rollout settings."""
    cfg = dataclasses.replace(cfg, student=checkpoint, teacher=checkpoint).validate()
    params, config = load_hf_checkpoint(checkpoint, dtype=jnp.dtype(cfg.compute_dtype))
    tokenizer = load_tokenizer(cfg.tokenizer or checkpoint)
    tasks = list_tasks(cfg.env, cfg.eval_split, data_dir=cfg.data_dir or None)[:cfg.eval_limit or None]
    with EnvPool(cfg.env, env_kwargs(cfg, expert=False), num_workers=cfg.num_workers) as pool:
        summary, _ = evaluate_policy(RolloutRunner(pool, tokenizer, rollout_config(cfg, evaluation=True)), tasks,
                                     Policy(params, config), jax.random.PRNGKey(cfg.seed), cfg.progress)
    return summary


def _kl_by_turn(turns, batch, max_turns: int) -> list[float | None]:
    """Mean sampled teacher-student KL (log p_S_old - log p_T per token) of student turns, by turn index."""
    sums, counts = defaultdict(float), defaultdict(float)
    for i, (turn, index) in enumerate(turns):
        m = batch["student_mask"][i]
        if m.sum():
            sums[index] += float(((batch["old_logprobs"][i] - batch["teacher_logprobs"][i]) * m).sum())
            counts[index] += float(m.sum())
    return [sums[t] / counts[t] if counts[t] else None for t in range(max_turns)]


def _pad_rows(batch: dict, multiple: int) -> dict:
    """Grow the row count to multiple * 2^k with empty rows, so few accumulation shapes get compiled."""
    rows = batch["tokens"].shape[0]
    target = multiple * (1 << max(0, (-(-rows // multiple) - 1).bit_length()))
    return {k: np.concatenate([v, np.zeros((target - rows, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def _logprobs(policy: Policy, batch: dict, rows: int) -> np.ndarray:
    """log p(targets) under `policy` for every row, `rows` rows per jitted call."""
    return np.concatenate([np.asarray(teacher_logprobs(policy.params, policy.config,
                                                       jnp.asarray(batch["tokens"][i:i + rows]),
                                                       jnp.asarray(batch["targets"][i:i + rows])))
                           for i in range(0, batch["tokens"].shape[0], rows)])


def _score(batch: dict, teacher: Policy, student: Policy | None, rows: int, loss_cfg: LossConfig) -> None:
    """Fill what the loss needs from the models: teacher log-probs on student tokens; for a reverse KL on
    teacher-owned tokens also the teacher's and the (pre-update) student's log-probs there; for the exact
    estimator the teacher's hidden states."""
    owned = batch["student_mask"].copy()
    if loss_cfg.teacher_kl == "reverse":
        owned += batch["teacher_mask"]
        batch["old_logprobs"] = batch["old_logprobs"] + _logprobs(student, batch, rows) * batch["teacher_mask"]
    batch["teacher_logprobs"] = _logprobs(teacher, batch, rows) * owned if owned.any() else np.zeros_like(owned)
    if loss_cfg.estimator == "exact":
        batch["teacher_hidden"] = np.concatenate([
            np.asarray(teacher_hidden(teacher.params, teacher.config, jnp.asarray(batch["tokens"][i:i + rows])),
                       np.float32) for i in range(0, batch["tokens"].shape[0], rows)])


def _normalise_masks(batch: dict, n_micro: int, aggregation: str) -> dict:
    """Turn each owner's 0/1 mask into weights such that the update step's mean over `n_micro`
    micro-batches of weighted sums is the token (or sequence) mean over the whole step's batch."""
    out = dict(batch)
    for name in ("student_mask", "teacher_mask"):
        mask = batch[name]
        if aggregation == "sequence_mean":
            per_row = mask.sum(1, keepdims=True)
            mask, total = mask / np.maximum(per_row, 1.0), float((per_row > 0).sum())
        else:
            total = float(mask.sum())
        out[name] = mask * (n_micro / total if total else 0.0)
    return out


def run_experiment(cfg: ExperimentConfig) -> dict:
    """Train (unless steps == 0) and evaluate one configuration; returns the final evaluation summary."""
    cfg.validate()
    out = Path(cfg.out_dir)
    save_config(cfg, out)
    print(f"[{cfg.name}] config:\n{cfg.to_json()}", flush=True)

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.student)
    compute_dtype = jnp.dtype(cfg.compute_dtype)
    params, s_config = load_hf_checkpoint(cfg.student, dtype=jnp.float32)  # float32 master weights
    t_params, t_config = load_hf_checkpoint(cfg.teacher, dtype=compute_dtype)
    teacher_tok = (load_tokenizer(cfg.teacher) if (Path(cfg.teacher) / "tokenizer_config.json").is_file()
                   and not cfg.tokenizer else None)
    check_compatible(s_config, t_config, tokenizer, teacher_tok)
    if len(tokenizer) > s_config.vocab_size:
        raise ValueError(f"tokenizer {cfg.tokenizer or cfg.student!r} has {len(tokenizer)} tokens but the models' "
                         f"vocab_size is {s_config.vocab_size}: use the tokenizer the models were trained with")
    teacher = Policy(t_params, t_config)
    data_dir = cfg.data_dir or None
    train_tasks = list_tasks(cfg.env, cfg.train_split, data_dir=data_dir)
    eval_tasks = list_tasks(cfg.env, cfg.eval_split, data_dir=data_dir)[:cfg.eval_limit or None]
    schedule = make_curriculum(cfg)
    depth = cur.tcod_depth(cfg.steps, rollout_config(cfg).turn_limit, cfg.rho) if cfg.method == "tcod" else None

    n_dev = jax.local_device_count()
    optimizer = make_optimizer(cfg.learning_rate, weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm)
    state = init_train_state(params, optimizer, jax.random.PRNGKey(cfg.seed))
    ckpt = Checkpointer(out / "checkpoints", max_to_keep=cfg.keep_checkpoints)
    start = 0
    if ckpt.latest_step() is not None:
        state, extra = ckpt.restore(state)
        start = extra["next_step"]
        print(f"[{cfg.name}] resumed from checkpoint at step {start}", flush=True)
    state = replicate(state)
    # SFT is the teacher-owned forward KL on expert tokens, i.e. cross-entropy, whatever the ablation fields say.
    loss_cfg = (LossConfig(aggregation="weighted_sum") if cfg.method == "sft" else
                LossConfig.variant(cfg.kl_variant, estimator=cfg.estimator, clip_eps=cfg.clip_eps,
                                   aggregation="weighted_sum"))
    loss_fn = with_compute_dtype(functools.partial(distill_loss_fn, config=s_config, loss_config=loss_cfg),
                                 compute_dtype)
    updates = {}  # accumulation steps -> compiled pmap step

    def student_policy():
        host = unreplicate(state.params)
        return Policy(jax.tree.map(lambda x: x.astype(compute_dtype), host), s_config)

    logger = MetricsLogger(out, resume_from=start)
    base_key = jax.random.PRNGKey(cfg.seed)
    # Task ids carry the data path, so workers need no data_dir.
    with EnvPool(cfg.env, env_kwargs(cfg, expert=cfg.method == "sft"), num_workers=cfg.num_workers) as pool:
        runner = RolloutRunner(pool, tokenizer, rollout_config(cfg))
        eval_runner = RolloutRunner(pool, tokenizer, rollout_config(cfg, evaluation=True))
        turn_limit = runner.config.turn_limit

        def evaluate(step):
            summary, _ = evaluate_policy(eval_runner, eval_tasks, student_policy(),
                                         jax.random.fold_in(base_key, 10_000_000 + step), cfg.progress)
            logger.log_eval(step, summary)
            return summary

        for step in trange(start, cfg.steps, desc=cfg.name, disable=not cfg.progress, initial=start,
                           total=cfg.steps):
            t0 = time.perf_counter()
            beta = float(cur.beta_at(schedule, step))
            rng = np.random.default_rng([cfg.seed, step])
            tasks = [train_tasks[i] for i in rng.choice(len(train_tasks), cfg.batch_tasks,
                                                        replace=len(train_tasks) < cfg.batch_tasks)]
            key = jax.random.fold_in(base_key, step)
            if cfg.method == "sft":
                policies, owners = {TEACHER: EXPERT, STUDENT: EXPERT}, owners_from_beta(1.0)
            elif cfg.method == "tcod":
                policies, owners = {STUDENT: student_policy(), TEACHER: teacher}, owners_student_first(
                    int(cur.depth_at(depth, step)))
            else:
                policies, owners = {STUDENT: student_policy(), TEACHER: teacher}, owners_from_beta(beta)
            episodes, rstats = runner.run(tasks, policies, owners, key, progress=False)
            indexed = [(t, i) for e in episodes for i, t in enumerate(e.turns)]
            if not indexed:  # every environment died at reset: nothing to learn from; logged, not trained on
                logger.log_train({"step": step, "beta": beta, "skipped": 1.0, "env_failures": len(episodes),
                                  "kl_by_turn": [None] * turn_limit})
                continue
            batch = training_batch([t for t, _ in indexed], pad_id=tokenizer.pad_token_id or 0)
            batch = _pad_rows(batch, n_dev * cfg.micro_batch_rows)
            _score(batch, teacher, policies.get(STUDENT), n_dev * cfg.micro_batch_rows, loss_cfg)
            accum = batch["tokens"].shape[0] // (n_dev * cfg.micro_batch_rows)
            if accum not in updates:
                updates[accum] = pmap_update_step(loss_fn, optimizer, accum_steps=accum)
            kw = {"beta": jnp.float32(beta)}
            if cfg.estimator == "exact":
                kw["teacher_head"] = output_head(t_params, t_config)
            weighted = _normalise_masks(batch, n_dev * accum, cfg.aggregation)
            state, metrics = updates[accum](state, shard_batch(weighted, n_dev), **kw)
            metrics = {k: float(np.asarray(v)[0]) for k, v in metrics.items()}
            results = [e.result for e in episodes]
            record = {
                "step": step, "beta": beta, **metrics,
                "n_student_tokens": float(batch["student_mask"].sum()),
                "n_teacher_tokens": float(batch["teacher_mask"].sum()),
                "teacher_turn_frac": float(np.mean([t.owner == TEACHER for t, _ in indexed])),
                "train_success": 100 * float(np.mean([r.won for r in results])),
                "train_score": float(np.mean([r.score for r in results])),
                "train_rounds": float(np.mean([r.rounds for r in results])),
                "invalid_action_frac": float(np.mean([t.action is None for t, _ in indexed])),
                "env_failures": sum(r.env_failed for r in results),
                "env_wait_frac": rstats["env_wait_s"] / max(rstats["wall_s"], 1e-9),
                "generate_s": rstats["generate_s"], "rollout_s": rstats["wall_s"],
                "step_s": time.perf_counter() - t0,
                "kl_by_turn": _kl_by_turn(indexed, batch, turn_limit),
            }
            if cfg.method == "tcod":
                record["tcod_depth"] = int(cur.depth_at(depth, step))
            logger.log_train(record)
            done = step + 1 == cfg.steps
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not done:
                evaluate(step + 1)
            if done or (step + 1) % cfg.checkpoint_every == 0:
                ckpt.save(step + 1, unreplicate(state), {"next_step": step + 1, "beta": beta, "config": cfg.to_json()})
        final = evaluate(cfg.steps)
    ckpt.close()
    logger.close()
    # The trained student leaves in the format it came in: a Hugging Face checkpoint directory.
    save_hf_checkpoint(unreplicate(state.params), s_config, out / "final_model")
    tokenizer.save_pretrained(out / "final_model")
    (out / "final_eval.json").write_text(json.dumps(final, indent=2))
    write_report(out, cfg.name)
    return final
