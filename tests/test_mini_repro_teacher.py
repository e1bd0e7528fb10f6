"""The mini-scale teacher stage: SFT from the cached expert corpus, killed and resumed = trained in one go."""
import dataclasses
import json

import jax
import numpy as np
import pytest

pytest.importorskip("alfworld", reason="alfworld is not installed (pip install alfworld)")

from experiments import mini_repro  # noqa: E402
from gopd_jax.models import load_hf_checkpoint  # noqa: E402
from tests.policies import alfworld_data_available  # noqa: E402


pytestmark = pytest.mark.skipif(not alfworld_data_available(), reason="ALFWorld game files not found (alfworld-download)")


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini")
    mini = dataclasses.replace(
        mini_repro.PRESETS["quick"], out_dir=str(root), corpus_dir=str(root / "corpus"), corpus_games=2,
        corpus_min_games=2, tokenizer_games=2, corpus_workers=1, num_workers=1, vocab_size=300, max_prompt_tokens=480,
        teacher_layers=1, teacher_hidden=32, teacher_experts=2, teacher_steps=4, teacher_tokens_per_batch=2048,
        teacher_prompt_weight=0.1, teacher_checkpoint_every=2, teacher_log_every=1, teacher_eval_steps=(),
        teacher_final_eval_games=1, teacher_eval_turns=1,
        max_new_tokens=4, progress=False)
    mini_repro.build_expert_corpus(mini)
    return mini


def killed_at(real, step, phase=None):
    """`real` (ec.sft_batches) killed (KeyboardInterrupt) before training the phase's local `step`; every phase's
    when `phase` is None."""
    def batches(*args, **kwargs):
        for local, epoch, batch in real(*args, **kwargs):
            if local == step and phase in (None, kwargs["seed"]):
                raise KeyboardInterrupt
            yield local, epoch, batch
    return batches


def _params(out):
    return jax.tree.leaves(load_hf_checkpoint(out / "final_model")[0])


def test_killed_teacher_resumes_to_the_same_weights(mini, tmp_path, monkeypatch):
    tokenizer = mini_repro.build_tokenizer(mini, tmp_path / "tokenizer")
    mini_repro.train_teacher(mini, tokenizer, tmp_path / "straight")

    real = mini_repro.ec.sft_batches

    monkeypatch.setattr(mini_repro.ec, "sft_batches", killed_at(real, 3))  # after the checkpoint of step 2
    with pytest.raises(KeyboardInterrupt):
        mini_repro.train_teacher(mini, tokenizer, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "final_model").exists()
    monkeypatch.setattr(mini_repro.ec, "sft_batches", real)
    mini_repro.train_teacher(mini, tokenizer, tmp_path / "resumed")

    for a, b in zip(_params(tmp_path / "straight"), _params(tmp_path / "resumed"), strict=True):
        np.testing.assert_array_equal(a, b)
    steps = [r["step"] for r in mini_repro.read_jsonl(tmp_path / "resumed" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]  # nothing lost or logged twice across the kill
    assert (tmp_path / "resumed" / "final_eval.json").is_file()


@pytest.fixture(scope="module")
def dagger(mini, tmp_path_factory):
    """SFT on the handcoded expert's corpus, then one DAgger round (the teacher plays, the expert labels), trained
    straight through: (mini, tokenizer, the run's directory)."""
    root = tmp_path_factory.mktemp("dagger")
    mini = dataclasses.replace(mini, teacher_expert="handcoded", teacher_corpus_dir=str(root / "hc"),
                               dagger_rounds=1, dagger_games=1, dagger_steps=2, teacher_eval_turns=30)
    mini_repro.build_teacher_corpus(mini)
    tokenizer = mini_repro.build_tokenizer(mini, root / "tokenizer")
    mini_repro.train_teacher(mini, tokenizer, root / "straight")
    return mini, tokenizer, root / "straight"


def test_teacher_with_dagger_rounds_resumes_to_the_same_weights(dagger, tmp_path, monkeypatch):
    """Killed inside the DAgger round's training and resumed = trained in one go; the round's episodes are
    labelled."""
    mini, tokenizer, straight = dagger
    real = mini_repro.ec.sft_batches

    # global step 5: after the boundary checkpoint of step 4
    monkeypatch.setattr(mini_repro.ec, "sft_batches", killed_at(real, 1, phase=1))
    with pytest.raises(KeyboardInterrupt):
        mini_repro.train_teacher(mini, tokenizer, tmp_path / "resumed")
    monkeypatch.setattr(mini_repro.ec, "sft_batches", real)
    mini_repro.train_teacher(mini, tokenizer, tmp_path / "resumed")

    for a, b in zip(_params(straight), _params(tmp_path / "resumed"), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [r["step"] for r in mini_repro.read_jsonl(tmp_path / "resumed" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    (record,) = mini_repro.ec.load_corpus(tmp_path / "resumed" / "dagger" / "round-1")
    assert record["labelled"] and all(t["label"] in t["admissible_actions"] for t in record["turns"])
    assert mini_repro.ec.load_corpus(straight / "dagger" / "round-1") == [record]


def test_offline_teacher_stops_before_its_dagger_round_and_resumes_to_the_same_weights(dagger, tmp_path,
                                                                                      monkeypatch):
    """--offline (a GPU machine without ALFWorld) trains the SFT steps and stops where the DAgger round would play
    games, recording which steps ran there even when killed; the same stage where the environment runs finishes it
    = trained in one go."""
    mini, tokenizer, straight = dagger
    real = mini_repro.ec.sft_batches

    monkeypatch.setattr(mini_repro.ec, "sft_batches", killed_at(real, 3))  # after the checkpoint of step 2
    with pytest.raises(KeyboardInterrupt):
        mini_repro.train_teacher(mini, tokenizer, tmp_path / "t", offline=True)
    (record,) = mini_repro.read_jsonl(tmp_path / "t" / "offline.jsonl")
    assert record["steps"] == [0, 2]  # what the checkpoint holds
    monkeypatch.setattr(mini_repro.ec, "sft_batches", real)
    assert mini_repro.train_teacher(mini, tokenizer, tmp_path / "t", offline=True) is None
    assert not (tmp_path / "t" / "dagger").exists() and not (tmp_path / "t" / "final_model").exists()
    records = mini_repro.read_jsonl(tmp_path / "t" / "offline.jsonl")
    assert [r["steps"] for r in records] == [[0, 2], [2, 4]] and records[1]["skipped_evaluations"] == []
    mini_repro.train_teacher(mini, tokenizer, tmp_path / "t")
    for a, b in zip(_params(straight), _params(tmp_path / "t"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_teacher_curve_and_checkpoints_report_expert_agreement(mini, tmp_path):
    mini = dataclasses.replace(mini, agreement_corpus_dir=mini.corpus_dir, teacher_eval_steps=(4,),
                               teacher_eval_games=2)
    tokenizer = mini_repro.build_tokenizer(mini, tmp_path / "tokenizer")
    mini_repro.train_teacher(mini, tokenizer, tmp_path / "teacher")
    logged = json.loads((tmp_path / "teacher" / "curve.json").read_text())[-1]
    params, config = load_hf_checkpoint(tmp_path / "teacher" / "final_model")
    rendered = mini_repro.ec.render_corpus(mini.corpus_dir, tokenizer, mini_repro.rollout_settings(mini),
                                           won_only=False, progress=False)
    want = mini_repro.ec.expert_agreement(params, config, rendered, mini.teacher_tokens_per_batch)
    totals = ("agreement", "reply_nll", "turns")
    assert logged["step"] == 4
    assert {k: logged["agreement"][k] for k in totals} == pytest.approx({k: want[k] for k in totals}, rel=1e-4)
    assert logged["agreement"]["by_task_type"] == want["by_task_type"]
    # The teacher's breakdown by the expert action's verb covers every turn, once.
    by_action = logged["agreement"]["by_action"]
    assert {"go", "take"} <= set(by_action) and sum(v["turns"] for v in by_action.values()) == want["turns"]
    assert "expert agreement" in (tmp_path / "teacher" / "curve.md").read_text()
    again = mini_repro.checkpoint_agreement(tmp_path)
    assert again["step"] == 4 and again["by_action"] == by_action
    assert {k: again[k] for k in totals} == pytest.approx({k: want[k] for k in totals}, rel=1e-4)
    # Any finished model of the out-dir (here the teacher's final weights), written beside it.
    final = mini_repro.model_agreement(dataclasses.replace(mini, out_dir=str(tmp_path)), "teacher")
    assert {k: final[k] for k in totals} == pytest.approx({k: want[k] for k in totals}, rel=1e-4)
    assert final["by_action"] == by_action
    assert json.loads((tmp_path / "teacher" / "agreement.json").read_text()) == final
    # A checkpoint exported for a pilot is the model the run saved at that step, with its tokenizer.
    exported = mini_repro.export_teacher(tmp_path, 4, tmp_path / "exported")
    leaves = jax.tree.leaves(load_hf_checkpoint(exported)[0])
    for a, b in zip(_params(tmp_path / "teacher"), leaves, strict=True):
        np.testing.assert_array_equal(a, b)
    assert mini_repro.load_tokenizer(exported).get_vocab() == tokenizer.get_vocab()


def test_student_warm_up_learns_from_the_corpus_and_is_evaluated_like_the_distilled_runs(mini, tmp_path, monkeypatch):
    """The warm-up SFTs a dense student on the teacher's corpus with the teacher's recipe, and its start-of-table
    evaluation is the draw every seed-0 distillation run ends with, so start and end compare game for game."""
    from gopd_jax.evaluate import eval_tasks

    mini = dataclasses.replace(mini, warmup_sft_steps=3, warmup_eval_steps=(2,), student_layers=1)
    tokenizer = mini_repro.build_tokenizer(mini, tmp_path / "tokenizer")
    final = mini_repro.warm_up_student(mini, tokenizer, tmp_path / "d16_warmup", hidden=16)

    params, config = load_hf_checkpoint(final)
    assert (config.hidden_size, config.num_hidden_layers, config.num_experts) == (16, 1, 0)
    logged = mini_repro.read_jsonl(tmp_path / "d16_warmup" / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 3] and logged[-1]["loss"] < logged[0]["loss"]
    curve = json.loads((tmp_path / "d16_warmup" / "curve.json").read_text())
    assert [c["step"] for c in curve] == [2, 3]  # the asked-for step and the end of its only phase
    summary = json.loads((tmp_path / "d16_warmup" / "final_eval.json").read_text())
    distilled_draw = eval_tasks(mini_repro._base(mini, seed=0))
    assert [g["game"] for g in summary["games"]] == [t.game_id for t in distilled_draw]

    def no_second_run(*args, **kwargs):
        raise AssertionError("a finished warm-up is trained or evaluated again")

    monkeypatch.setattr(mini_repro, "train_on_corpus", no_second_run)
    monkeypatch.setattr(mini_repro, "evaluate_checkpoint", no_second_run)
    assert mini_repro.warm_up_student(mini, tokenizer, tmp_path / "d16_warmup", hidden=16) == final
    # A warm-up made with another step count is not reused as this preset's start.
    with pytest.raises(ValueError, match=r"warmup_sft_steps 3 there, 4 here.*delete"):
        mini_repro.warm_up_student(dataclasses.replace(mini, warmup_sft_steps=4), tokenizer, tmp_path / "d16_warmup",
                                   hidden=16)
