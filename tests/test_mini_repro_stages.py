"""Which mini_repro stages a command runs: --until stops after a stage, --only runs one stage after the corpus and
tokenizer it needs (the warm-ups and the teacher in two processes)."""
import dataclasses

import pytest

from experiments import mini_repro


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """The stage functions replaced by recorders: this is about the order and selection of stages only."""
    log = []
    monkeypatch.setattr(mini_repro, "build_expert_corpus", lambda mini: log.append("corpus"))
    monkeypatch.setattr(mini_repro, "build_teacher_corpus", lambda mini: log.append("teacher_corpus"))
    monkeypatch.setattr(mini_repro, "build_tokenizer", lambda mini, out: log.append("tokenizer") or [0] * 1024)
    monkeypatch.setattr(mini_repro, "warm_up_student", lambda mini, tok, out, hidden: log.append(out.name) or "")
    monkeypatch.setattr(mini_repro, "train_teacher", lambda mini, tok, out: log.append("teacher") or "")
    return log


def _mini(tmp_path):
    return dataclasses.replace(mini_repro.PRESETS["full"], out_dir=str(tmp_path), progress=False)


@pytest.mark.parametrize("until, only, stages", [
    ("warmup", None, ["d64_warmup", "d96_warmup"]),
    ("teacher", None, ["d64_warmup", "d96_warmup", "teacher"]),
    ("all", "warmup", ["d64_warmup", "d96_warmup"]),
    ("all", "teacher", ["teacher"]),
])
def test_until_and_only_select_the_stages(calls, tmp_path, until, only, stages):
    mini_repro.run(_mini(tmp_path), until, only)
    assert calls == ["corpus", "teacher_corpus", "tokenizer", *stages]


def test_only_names_a_single_stage(calls, tmp_path):
    with pytest.raises(ValueError, match="only must be 'warmup' or 'teacher'"):
        mini_repro.run(_mini(tmp_path), only="grid")
    assert calls == []


def test_grid_runs_the_compared_methods_on_every_seed_before_the_baselines():
    mini = dataclasses.replace(mini_repro.PRESETS["full"], student_hidden=(64, 96), seeds=(0, 1),
                               baselines=("sft", "fixed_beta"), baseline_seeds=(0,))
    assert mini_repro.grid_order(mini) == [
        (0, 64, "opd"), (0, 64, "guided_opd"), (0, 96, "opd"), (0, 96, "guided_opd"),
        (1, 64, "opd"), (1, 64, "guided_opd"), (1, 96, "opd"), (1, 96, "guided_opd"),
        (0, 64, "sft"), (0, 64, "fixed_beta"), (0, 96, "sft"), (0, 96, "fixed_beta")]
