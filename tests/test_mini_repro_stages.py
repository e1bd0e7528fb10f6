"""Which mini_repro stages a command runs: --until stops after a stage, --only runs one stage after the corpus and
tokenizer it needs (the warm-ups and the teacher in two processes)."""
import dataclasses
import json
import tarfile

import pytest

from experiments import mini_repro


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """The stage functions replaced by recorders: this is about the order and selection of stages only."""
    log = []
    monkeypatch.setattr(mini_repro, "build_expert_corpus", lambda mini: log.append("corpus"))
    monkeypatch.setattr(mini_repro, "build_teacher_corpus", lambda mini: log.append("teacher_corpus"))
    monkeypatch.setattr(mini_repro, "unpack_start", lambda mini: log.append("start"))
    monkeypatch.setattr(mini_repro, "build_tokenizer", lambda mini, out: log.append("tokenizer") or [0] * 1024)
    monkeypatch.setattr(mini_repro, "warm_up_student", lambda mini, tok, out, hidden, offline: log.append(out.name) or "")
    monkeypatch.setattr(mini_repro, "train_teacher", lambda mini, tok, out, offline: log.append("teacher") or "")
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
    assert calls == ["corpus", "teacher_corpus", "start", "tokenizer", *stages]


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


def test_offline_skips_the_environment_stages_and_from_scratch_the_shipped_start(calls, tmp_path):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{}")
    mini = dataclasses.replace(_mini(tmp_path), teacher_corpus_dir=str(tmp_path / "corpus"))
    with pytest.raises(SystemExit, match="--offline trains from a corpus and tokenizer already on disk"):
        mini_repro.run(mini, offline=True)  # no corpus here: it is built where the environment runs
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "meta.json").write_text("{}")
    calls.clear()
    mini_repro.run(mini, offline=True, from_scratch=True)
    assert calls == ["tokenizer", "d64_warmup", "d96_warmup", "teacher"]  # and no grid: it plays games


def _fake_stage(root, name, *, finished, checkpoints=(), dagger=False):
    d = root / name
    (d / "final_model").mkdir(parents=True)
    (d / "final_model" / "model.safetensors").write_text(name)
    (d / "metrics.jsonl").write_text("{}\n")
    if finished:
        (d / "final_eval.json").write_text("{}")
    for step in checkpoints:
        (d / "checkpoints" / str(step)).mkdir(parents=True)
        (d / "checkpoints" / str(step) / "state").write_text(str(step))
    if dagger:
        (d / "dagger" / "round-1").mkdir(parents=True)
        (d / "dagger" / "round-1" / "meta.json").write_text("{}")


def test_a_packed_start_seeds_a_fresh_out_dir_made_with_the_same_settings(tmp_path):
    mini = _mini(tmp_path / "made")
    made = tmp_path / "made"
    (made / "tokenizer").mkdir(parents=True)
    (made / "tokenizer" / "tokenizer.json").write_text("{}")
    _fake_stage(made, "d64_warmup", finished=True, checkpoints=[1000])
    _fake_stage(made, "d96_warmup", finished=True, checkpoints=[1000])
    _fake_stage(made, "teacher", finished=False, checkpoints=[3400, 3500], dagger=True)
    archive = mini_repro.pack_start(mini, tmp_path / "start.tar.xz")

    # Grid-only settings (the distillation rate, seeds) may differ: the start is the same.
    fresh = dataclasses.replace(mini, out_dir=str(tmp_path / "fresh"), learning_rate=1e-3, seeds=(5,))
    assert mini_repro.unpack_start(fresh, archive)
    got = sorted(str(p.relative_to(tmp_path / "fresh")) for p in (tmp_path / "fresh").rglob("*") if p.is_file())
    assert got == ["d64_warmup/final_eval.json", "d64_warmup/final_model/model.safetensors",
                   "d64_warmup/metrics.jsonl", "d96_warmup/final_eval.json",
                   "d96_warmup/final_model/model.safetensors", "d96_warmup/metrics.jsonl",
                   # the unfinished teacher keeps its latest checkpoint and its DAgger corpus: it resumes
                   "teacher/checkpoints/3500/state", "teacher/dagger/round-1/meta.json",
                   "teacher/final_model/model.safetensors", "teacher/metrics.jsonl", "tokenizer/tokenizer.json"]
    assert not mini_repro.unpack_start(fresh, archive)  # an out-dir that has a tokenizer is never overwritten

    other = dataclasses.replace(mini, out_dir=str(tmp_path / "other"), teacher_steps=100)
    assert not mini_repro.unpack_start(other, archive)  # another teacher recipe: trained, not unpacked
    assert not (tmp_path / "other").exists()


def test_the_shipped_start_is_the_full_presets():
    """A fresh `--preset full` run unpacks the shipped start only under the settings it was made with: a default
    that changes what the start is (a teacher or warm-up setting) must come with a repacked start."""
    with tarfile.open(mini_repro.START_SNAPSHOT, "r:xz") as tar:
        saved = json.load(tar.extractfile("start.json"))
        names = {m.name.split("/")[0] for m in tar.getmembers()}
    assert saved == mini_repro.start_settings(mini_repro.PRESETS["full"])
    assert names == {"start.json", "tokenizer", "d64_warmup", "d96_warmup", "teacher"}


def test_a_grid_resumes_under_another_worker_count_only_with_resume_anyway(monkeypatch, tmp_path):
    """The run refused for another worker count names --resume-anyway: mini_repro's own flag must reach the runs.
    Progress bars never block a resume (the background command switches them off)."""
    from gopd_jax.experiment import check_resume

    seen = []
    monkeypatch.setattr(mini_repro, "run", lambda mini, *rest: seen.append(mini))
    mini_repro.main(["--out-dir", str(tmp_path), "--set", "num_workers=1"])
    mini_repro.main(["--out-dir", str(tmp_path), "--set", "num_workers=1", "--resume-anyway", "--no-progress"])
    plain, anyway = seen
    saved = mini_repro._base(_mini(tmp_path), seed=0).to_json()  # started with 2 workers, progress off
    with pytest.raises(ValueError, match="(?s)num_workers: 2 there, 1 now.*--resume-anyway"):
        check_resume(saved, mini_repro._base(plain, seed=0))
    assert check_resume(saved, mini_repro._base(anyway, seed=0)) == {"num_workers": (2, 1)}
    same = dataclasses.replace(plain, num_workers=2)
    assert same.progress and check_resume(saved, mini_repro._base(same, seed=0)) == {}
