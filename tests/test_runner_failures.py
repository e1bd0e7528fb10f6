"""Issue 9 on whole runs (tiny real models, real ALFWorld games): a different experiment never resumes or reuses
another's run, the final evaluation is logged once whatever was killed when, a run that only skips steps stops,
checkpoints are evaluated only with a tokenizer that fits, and an expert whose worker dies loses one episode."""

import dataclasses
import json
import os
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from experiments.mini_repro import _dense
from gopd_jax.checkpointing import Checkpointer
from gopd_jax.envs import TaskSpec
from gopd_jax.evaluate import evaluate_checkpoint, summarize
from gopd_jax.experiment import ExperimentConfig
from gopd_jax.models import load_hf_checkpoint, save_hf_checkpoint
from gopd_jax.reporting import EVAL_LOG, TRAIN_LOG, read_jsonl
from gopd_jax.records import EXPERT, STUDENT, TEACHER, EpisodeResult
from gopd_jax.runner import run_experiment
from gopd_jax.tokenizer import load_tokenizer
from gopd_jax.train import init_train_state, make_optimizer
from tests.policies import random_checkpoint, tiny_checkpoints

pytest.importorskip("alfworld")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_checkpoints(tmp_path_factory.mktemp("models"), moe_teacher=False)


def _config(models, out, **kw):
    student, teacher = models
    base = dict(name="fail", out_dir=str(out), student=student, teacher=teacher, steps=3, batch_tasks=2, max_turns=2,
                max_new_tokens=6, think=False, k_history=1, learning_rate=1e-3, compute_dtype="float32",
                micro_batch_rows=2, num_workers=2, eval_limit=2, eval_every=0, checkpoint_every=1, progress=False)
    return ExperimentConfig(**{**base, **kw})


def _checkpointed(cfg: ExperimentConfig, step: int) -> None:
    """The run directory `cfg` leaves when killed right after checkpoint `step` (the state the runner saves)."""
    params, _ = load_hf_checkpoint(cfg.student, dtype=jnp.float32)
    optimizer = make_optimizer(cfg.learning_rate, weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm)
    state = init_train_state(params, optimizer, jax.random.PRNGKey(cfg.seed))
    with Checkpointer(f"{cfg.out_dir}/checkpoints") as ckpt:
        ckpt.save(step, state, {"next_step": step, "beta": 0.0, "config": cfg.to_json()})
    (Path(cfg.out_dir) / "config.json").write_text(cfg.to_json())


# ---- item 1 -----------------------------------------------------------------------------------------------------

def test_resume_by_another_experiment_is_refused_before_any_work(models, tmp_path):
    old = _config(models, tmp_path / "run")
    _checkpointed(old, 2)
    for change in ({"learning_rate": 5e-4}, {"method": "opd"}, {"student": models[1]}):
        with pytest.raises(ValueError, match=f"(?s)belongs to a different experiment.*{next(iter(change))}: .*"
                                             "new --out-dir"):
            run_experiment(dataclasses.replace(old, **change))
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == json.loads(old.to_json())  # kept
    with Checkpointer(tmp_path / "run" / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [2]  # nothing pruned, nothing trained
    assert not (tmp_path / "run" / TRAIN_LOG).exists()


def test_grid_refuses_a_finished_variant_of_another_experiment(models, tmp_path):
    from experiments.grid import run_variants

    base = _config(models, tmp_path / "grid")
    done = dataclasses.replace(base, name="grid/opd", out_dir=str(tmp_path / "grid" / "opd"), method="opd", seed=1)
    os.makedirs(done.out_dir)
    (tmp_path / "grid" / "opd" / "config.json").write_text(done.to_json())
    (tmp_path / "grid" / "opd" / "final_eval.json").write_text(json.dumps(
        {"score": 1.0, "success_rate": 0.0, "rounds": 2.0, "n": 2}))
    with pytest.raises(ValueError, match="seed: 1 there, 42 now"):
        run_variants(base, {"sft": dict(method="sft"), "opd": dict(method="opd")}, "t")
    assert not (tmp_path / "grid" / "sft").exists()  # refused before the first variant started


# ---- item 5 -----------------------------------------------------------------------------------------------------

def test_final_eval_is_logged_once_whatever_was_killed_when(models, tmp_path, capsys):
    cfg = _config(models, tmp_path / "run", steps=2)
    _checkpointed(cfg, 2)
    # Killed after the final evaluation was logged, before final_eval.json was written.
    task = TaskSpec("alfworld", "valid_unseen", "g", "pick_and_place_simple")
    summary = {**summarize([EpisodeResult(task, True, 100.0, 2), EpisodeResult(task, False, 0.0, 2)]),
               "success_by_turn": [0.0, 0.5]}
    out = tmp_path / "run"
    (out / TRAIN_LOG).write_text("".join(json.dumps({"step": s, "beta": 0.0, "loss": 1.0, "kl_by_turn": [0.1, None]})
                                         + "\n" for s in range(2)))
    (out / EVAL_LOG).write_text(json.dumps({"step": 1, **summary}) + "\n" + json.dumps({"step": 2, **summary}) + "\n")

    final = run_experiment(cfg)
    assert [r["step"] for r in read_jsonl(out / EVAL_LOG)] == [1, 2]
    assert final == summary and json.loads((out / "final_eval.json").read_text()) == summary
    assert (out / "final_model" / "model.safetensors").is_file() and (out / "results.md").is_file()

    # A finished run re-run is a no-op that says so (and logs nothing).
    logs = (out / EVAL_LOG).read_text(), (out / TRAIN_LOG).read_text()
    stamp = (out / "final_model" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert run_experiment(dataclasses.replace(cfg, num_workers=1)) == summary
    assert "already finished" in capsys.readouterr().out
    assert ((out / EVAL_LOG).read_text(), (out / TRAIN_LOG).read_text()) == logs
    assert (out / "final_model" / "model.safetensors").stat().st_mtime_ns == stamp


# ---- item 3 -----------------------------------------------------------------------------------------------------

def test_nan_student_is_refused_before_any_work(models, tmp_path):
    params, config = load_hf_checkpoint(models[0], dtype=jnp.float32)
    params["final_norm"] = params["final_norm"].at[3].set(jnp.nan)
    save_hf_checkpoint(params, config, tmp_path / "nan")
    load_tokenizer(models[0]).save_pretrained(tmp_path / "nan")
    with pytest.raises(ValueError, match="NaN or Inf.*model.norm.weight"):
        run_experiment(_config(models, tmp_path / "run", student=str(tmp_path / "nan")))
    assert not (tmp_path / "run" / TRAIN_LOG).exists()


def test_run_that_only_skips_steps_stops_naming_the_cause(models, tmp_path, monkeypatch):
    """A learning rate so high that the first update blows the weights up: every later update is non-finite
    and skipped, which used to run to the end and print a final evaluation."""
    monkeypatch.setattr("gopd_jax.train.MAX_CONSECUTIVE_SKIPS", 2, raising=False)  # 3 by default; fewer steps here
    cfg = _config(models, tmp_path / "run", learning_rate=1e30, steps=5)
    with pytest.raises(FloatingPointError, match="2 consecutive steps had a non-finite loss.*--learning-rate"):
        run_experiment(cfg)
    train = read_jsonl(tmp_path / "run" / TRAIN_LOG)
    assert [(r["step"], r["skipped"]) for r in train] == [(0, 0.0), (1, 1.0), (2, 1.0)]
    assert not (tmp_path / "run" / "final_eval.json").exists()


# ---- item 2 -----------------------------------------------------------------------------------------------------

def test_evaluating_a_checkpoint_with_a_too_large_tokenizer_is_refused(models, tmp_path):
    tok = load_tokenizer(models[0])
    small = random_checkpoint(_dense(len(tok) - 20, 32, 1), tok, tmp_path / "small", seed=3)
    cfg = _config(models, tmp_path / "eval", eval_limit=1, max_turns=1)
    with pytest.raises(ValueError, match=f"has {len(tok)} tokens but the model's vocab_size is {len(tok) - 20}"):
        evaluate_checkpoint(cfg, small)


# ---- item 10 ----------------------------------------------------------------------------------------------------

def test_worker_dying_while_the_expert_plays_fails_one_episode(models):
    from gopd_jax.envs import EnvPool, list_tasks
    from gopd_jax.methods import owners_from_beta
    from gopd_jax.rollout import RolloutConfig, RolloutRunner

    class DyingExpertPool(EnvPool):
        """A real pool whose worker is killed right before the first expert-actions request reaches it."""
        killed = False

        def expert_actions(self, slot):
            if not self.killed:
                self.killed = True
                os.kill(self._workers[slot].process.pid, signal.SIGKILL)
            return super().expert_actions(slot)

    tasks = list_tasks("alfworld", "valid_unseen")[:2]
    with DyingExpertPool("alfworld", num_workers=1) as pool:
        runner = RolloutRunner(pool, load_tokenizer(models[0]), RolloutConfig(env="alfworld", max_turns=3,
                                                                              think=False))
        episodes, _ = runner.run(tasks, {STUDENT: EXPERT, TEACHER: EXPERT}, owners_from_beta(1.0),
                                 jax.random.PRNGKey(0), progress=False)
        assert pool.restarts == 1
    first, second = sorted(episodes, key=lambda e: e.task.task_id != tasks[0].task_id)
    assert first.task == tasks[0] and first.result.env_failed and first.result.rounds == 0 and not first.turns
    assert second.task == tasks[1] and not second.result.env_failed and second.result.rounds == 3
    assert [t.owner for t in second.turns] == [TEACHER] * 3
