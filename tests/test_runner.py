"""The experiment runner end to end on tiny real models and real ALFWorld games: a couple of steps, outputs,
resume after a kill, and config errors that name the field before any work starts."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from experiments.mini_repro import _dense
from gopd_jax.experiment import ExperimentConfig
from gopd_jax.models import load_hf_checkpoint
from gopd_jax.runner import run_experiment
from gopd_jax.tokenizer import train_bpe_tokenizer
from tests.policies import random_checkpoint, tiny_checkpoints

pytest.importorskip("alfworld")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_checkpoints(tmp_path_factory.mktemp("models"), moe_teacher=True)


def _config(models, out, **kw):
    student, teacher = models
    return ExperimentConfig(name="smoke", out_dir=str(out), student=student, teacher=teacher, steps=3,
                            batch_tasks=2, max_turns=2, max_new_tokens=6, think=False, k_history=1,
                            learning_rate=1e-3, compute_dtype="float32", micro_batch_rows=2, num_workers=2,
                            eval_limit=2, eval_every=2, checkpoint_every=1, progress=False, **kw)


def test_runner_trains_evaluates_reports_and_resumes(models, tmp_path):
    cfg = _config(models, tmp_path / "a")
    final = run_experiment(cfg)
    out = tmp_path / "a"
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train] == [0, 1, 2] and [e["step"] for e in evals] == [2, 3]
    assert [r["beta"] for r in train] == pytest.approx([1.0, 0.5, 0.0], abs=1e-6)  # cosine, rho 0.8, N = 3
    assert train[0]["teacher_turn_frac"] == 1.0 and train[2]["teacher_turn_frac"] == 0.0
    assert all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in train)
    assert final["n"] == 2 and 0 <= final["success_rate"] <= 100
    # The action profile covers every turn played and agrees with the valid-action rate.
    turns = sum(c["turns"] for c in final["actions"].values())
    assert turns == final["rounds"] * final["n"] and turns > 0
    valid = sum(c["valid"] for c in final["actions"].values())
    assert 100 * valid / turns == pytest.approx(final["valid_action_rate"])
    assert {"plots.png", "results.md", "config.json", "final_eval.json"} <= {p.name for p in out.iterdir()}
    assert any((out / "tensorboard").iterdir())
    trained, _ = load_hf_checkpoint(out / "final_model", dtype=np.float32)
    start, _ = load_hf_checkpoint(models[0], dtype=np.float32)
    assert not np.allclose(trained["embed"], start["embed"])  # the update did something

    # A run killed after step 2's checkpoint: the rerun resumes there and redoes only step 3.
    resumed = tmp_path / "b"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "3")
    for name in ("final_model", "final_eval.json"):
        shutil.rmtree(resumed / name) if (resumed / name).is_dir() else (resumed / name).unlink()
    run_experiment(dataclasses.replace(cfg, out_dir=str(resumed)))
    train_b = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train_b] == [0, 1, 2]
    assert train_b[:2] == train[:2]
    # Rollouts are keyed by (seed, step, task, turn), so the resumed step replays the killed run's step.
    for k in ("beta", "n_student_tokens", "n_teacher_tokens", "teacher_turn_frac", "loss"):
        assert train_b[2][k] == pytest.approx(train[2][k], rel=1e-4, abs=1e-6), k
    resumed_params, _ = load_hf_checkpoint(resumed / "final_model", dtype=np.float32)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), resumed_params, trained)


@pytest.mark.parametrize("field,value,message", [
    ("student", "/nonexistent/ckpt", "config field 'student'.*no config.json"),
    ("env", "webshop2", "config field 'env'.*unknown environment"),
    ("eval_split", "valid_nowhere", "config field 'eval_split'"),
    ("method", "ppo", "config field 'method'"),
    ("temperature", 0.7, "config field 'temperature'.*biased.*--allow-biased-sampling"),
    ("top_p", 0.9, "config field 'top_p'.*biased"),
    ("mini_batches", 0, "config field 'mini_batches'"),
])
def test_bad_config_fails_before_work(models, tmp_path, field, value, message):
    cfg = dataclasses.replace(_config(models, tmp_path / "x"), **{field: value})
    with pytest.raises(ValueError, match=message):
        run_experiment(cfg)
    assert not (tmp_path / "x").exists()


def test_incompatible_teacher_tokenizer_is_refused(models, tmp_path):
    student, _ = models
    other = random_checkpoint(_dense(999, 32, 1), __import__("gopd_jax.tokenizer", fromlist=["x"]).load_tokenizer(
        student), tmp_path / "other", seed=2)
    with pytest.raises(ValueError, match="vocab_size"):
        run_experiment(dataclasses.replace(_config(models, tmp_path / "y"), teacher=other))


def test_teacher_with_a_different_tokenizer_is_refused(models, tmp_path):
    from gopd_jax.tokenizer import load_tokenizer

    student, _ = models
    size = len(load_tokenizer(student))
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 6)) for _ in range(3000)]
    other_tok = train_bpe_tokenizer([" ".join(words)], size, tmp_path / "tok2")
    if len(other_tok) != size:
        pytest.skip("could not train a same-size tokenizer on this corpus")
    teacher = random_checkpoint(_dense(size, 32, 1), other_tok, tmp_path / "t2", seed=3)
    with pytest.raises(ValueError, match="tokenizer vocabularies differ"):
        run_experiment(dataclasses.replace(_config(models, tmp_path / "z"), teacher=teacher))


def test_a_registered_toy_method_runs_in_the_runner_with_ppo_updates(models, tmp_path):
    """A method defined here, in one place, drives the unchanged runner; 2 PPO epochs x 2 mini-batches."""
    from gopd_jax import methods as M

    @M.register_method("test_teacher_on_odd_turns")
    def teacher_on_odd_turns(cfg):
        return M.Method(name="test_teacher_on_odd_turns", beta=lambda step: 0.25,
                        owners=lambda step: (lambda key, n, index: np.arange(n) % 2 == 1),
                        loss=M.default_loss(cfg), log=lambda step: {"toy_marker": step + 100})

    cfg = dataclasses.replace(_config(models, tmp_path / "toy"), method="test_teacher_on_odd_turns", steps=1,
                              eval_limit=1, eval_every=0, ppo_epochs=2, mini_batches=2)
    run_experiment(cfg)
    (record,) = [json.loads(line) for line in (tmp_path / "toy" / "metrics.jsonl").read_text().splitlines()]
    assert record["toy_marker"] == 100 and record["beta"] == 0.25 and record["updates"] == 4
    assert record["teacher_turn_frac"] == pytest.approx(0.5)  # 2 tasks x 2 turns: turn 1 of each is the teacher's
    assert record["n_student_tokens"] > 0 and record["n_teacher_tokens"] > 0
    assert abs(record["ppo_ratio"] - 1.0) > 1e-6  # later updates see moved params against the fixed p_S_old


@pytest.mark.multidevice
def test_runner_with_an_expert_parallel_moe_teacher_and_an_fsdp_student(models, tmp_path, capsys):
    """The paper's layout in miniature on 4 simulated devices: the MoE teacher's experts sharded over a mesh
    (generation, scoring and the exact estimator's in-step forward run on the shards), the student's params
    and AdamW state sharded FSDP-style; the memory plan is printed before any work."""
    assert jax.local_device_count() == 4
    cfg = dataclasses.replace(_config(models, tmp_path / "sharded"), steps=1, eval_limit=1, eval_every=0,
                              teacher_layout="expert", student_update="fsdp", estimator="exact")
    run_experiment(cfg)
    out = capsys.readouterr().out
    assert "device plan: 4 device(s)" in out and "teacher: expert; student update: fsdp (forced)" in out
    (record,) = [json.loads(line) for line in (tmp_path / "sharded" / "metrics.jsonl").read_text().splitlines()]
    assert record["skipped"] == 0 and np.isfinite(record["loss"]) and record["loss"] > 0  # exact KL > 0
    trained, _ = load_hf_checkpoint(tmp_path / "sharded" / "final_model", dtype=np.float32)
    start, _ = load_hf_checkpoint(models[0], dtype=np.float32)
    assert not np.allclose(trained["embed"], start["embed"])


def test_the_training_record_counts_the_students_valid_turns_only():
    from gopd_jax.envs import StepResult, TaskSpec
    from gopd_jax.records import STUDENT, TEACHER, Episode, EpisodeResult, Turn
    from gopd_jax.runner import _rollout_record

    def turn(owner, action, valid):
        return Turn(owner, np.zeros(2, np.int32), np.zeros(1, np.int32), np.zeros(1, np.float32), action,
                    StepResult("obs", 0.0, 0.0, False, False, ()), valid=valid)

    task = TaskSpec("alfworld", "train", "game", "pick_and_place_simple")
    # The rollout judges each turn (tests/test_rollout.py); the record averages the student's verdicts only.
    turns = [turn(STUDENT, "look", True), turn(TEACHER, "jump", False), turn(STUDENT, "jump", False),
             turn(STUDENT, None, False)]  # malformed: not valid, and counted as invalid too
    episode = Episode(0, task, "goal", turns, EpisodeResult(task, False, 0.0, 4))
    record = _rollout_record([episode], trained=turns)
    assert record["student_valid_action_frac"] == pytest.approx(1 / 3)
    assert record["invalid_action_frac"] == pytest.approx(1 / 4) and record["teacher_turn_frac"] == 0.25
    teacher_only = Episode(0, task, "goal", turns[1:2], EpisodeResult(task, False, 0.0, 1))
    assert np.isnan(_rollout_record([teacher_only], trained=[])["student_valid_action_frac"])
