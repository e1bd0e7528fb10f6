"""Issue 9: runs that cannot silently go wrong. The fast checks: config validation before any work, resume and
finished-run checks, logs cut off by a kill, a damaged ALFWorld archive and a worker that dies while starting.
(Damaged checkpoints: test_checkpoint_loader_errors.py; whole runs: test_runner_failures.py.)"""

import dataclasses
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from gopd_jax.checkpointing import Checkpointer
from gopd_jax.envs.alfworld_env import _unpack_once, list_alfworld_tasks
from gopd_jax.experiment import RUN_ONLY_FIELDS, ExperimentConfig, check_resume
from gopd_jax.models import Qwen3Config, init_params, save_hf_checkpoint
from gopd_jax.reporting import EVAL_LOG, TRAIN_LOG, MetricsLogger, finished_run, read_jsonl
from gopd_jax.tokenizer import train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
CFG = Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A real (tiny) checkpoint directory with its tokenizer: what validate needs to reach the data checks."""
    root = tmp_path_factory.mktemp("ckpt")
    train_bpe_tokenizer(["go to the sink and put the mug in it"] * 5, 300, root)
    save_hf_checkpoint(init_params(CFG, jax.random.PRNGKey(0)), CFG, root)
    return str(root)


def _cfg(ckpt, **kw):
    return ExperimentConfig(student=ckpt, teacher=ckpt, **kw)


# ---- item 4 and 6: every field checked by validate, before any work ---------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("aggregation", "nope", "choose one of token_mean, sequence_mean"),
    ("estimator", "nope", "choose one of sampled, exact"),
    ("compute_dtype", "foo", "choose one of float32, bfloat16, float16"),
    ("rho", 0.0, r"in \(0, 1\]"), ("rho", 1.5, r"in \(0, 1\]"), ("rho", -0.2, r"in \(0, 1\]"),
    ("clip_eps", 0.0, r"in \(0, 1\)"), ("clip_eps", 2.0, r"in \(0, 1\)"),
    ("checkpoint_every", 0, ">= 1"), ("keep_checkpoints", 0, ">= 1"), ("num_workers", 0, ">= 1"),
    ("eval_limit", -133, ">= 0"), ("temperature", -1.0, ">= 0"), ("learning_rate", 0.0, "> 0"),
    ("seed", -1, ">= 0"), ("rho", float("nan"), "finite float"), ("steps", 2.5, "expected a int"),
    ("think", "yes", "expected a bool"), ("expert", "oracle", "'walkthrough' and 'handcoded'"),
])
def test_validate_names_every_bad_field(ckpt, field, value, message):
    with pytest.raises(ValueError, match=f"config field '{field}': .*{message}"):
        _cfg(ckpt, **{field: value}).validate()


def test_the_handcoded_expert_is_alfworlds_only_and_reaches_its_workers():
    from gopd_jax.rollout import env_kwargs

    with pytest.raises(ValueError, match="config field 'expert': 'handcoded' is not a scienceworld expert"):
        ExperimentConfig(env="scienceworld", expert="handcoded").validate()
    assert env_kwargs("alfworld", True, "handcoded") == {"expert": "handcoded"}
    assert env_kwargs("alfworld", False, "handcoded") == {} == env_kwargs("alfworld", True)  # built only to play
    assert env_kwargs("scienceworld", True) == {"gold_path": True}


def test_cli_flags_are_validated_before_any_run(ckpt, tmp_path):
    """`experiments.baselines --rho 0` used to train SFT to the end before TCOD failed."""
    from experiments import baselines

    out = tmp_path / "baselines"
    with pytest.raises(ValueError, match="config field 'rho'"):
        baselines.main(["--student", ckpt, "--teacher", ckpt, "--out-dir", str(out), "--rho", "0", "--steps", "1"])
    assert not out.exists()


def test_evaluate_cli_rejects_a_negative_limit(capsys):
    from experiments import evaluate

    with pytest.raises(SystemExit):
        evaluate.main(["--policy", "expert", "--limit", "-133"])
    assert "--limit: must be >= 0" in capsys.readouterr().err


def test_empty_alfworld_data_is_an_error_naming_the_folder(ckpt, tmp_path, monkeypatch):
    (tmp_path / "json_2.1.1").mkdir()
    with pytest.raises(ValueError, match=r"config field 'data_dir': no ALFWorld games .*json_2.1.1/train"):
        _cfg(ckpt, data_dir=str(tmp_path)).validate()
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path))  # the case: the variable names an empty folder
    with pytest.raises(FileNotFoundError, match="alfworld-download"):
        list_alfworld_tasks("valid_unseen")


def test_bool_flags_work_bare_and_with_a_value():
    import argparse

    from gopd_jax.experiment import add_config_args, config_from_args

    ap = argparse.ArgumentParser()
    add_config_args(ap, ExperimentConfig())
    assert config_from_args(ap.parse_args(["--resume-anyway"])).resume_anyway is True
    assert config_from_args(ap.parse_args(["--think", "false"])).think is False
    assert config_from_args(ap.parse_args([])).resume_anyway is False


# ---- item 1: a different experiment never continues or reuses another's run -------------------------------------

def test_check_resume_lists_fields_and_ways_out(ckpt):
    saved = _cfg(ckpt, learning_rate=1e-6).to_json()
    assert check_resume(saved, _cfg(ckpt, learning_rate=1e-6, name="x", out_dir="elsewhere")) == {}
    with pytest.raises(ValueError, match=r"(?s)learning_rate: 1e-06 there, 0\.001 now.*new --out-dir.*accepts "
                                         r"differences only in num_workers"):
        check_resume(saved, _cfg(ckpt, learning_rate=1e-3, resume_anyway=True))
    # Run-only fields: refused unless --resume-anyway, which accepts them.
    with pytest.raises(ValueError, match="(?s)num_workers: 8 there, 2 now.*or pass --resume-anyway"):
        check_resume(saved, _cfg(ckpt, num_workers=2))
    assert check_resume(saved, _cfg(ckpt, num_workers=2, progress=False, resume_anyway=True)) == {
        "num_workers": (8, 2)}
    assert set(RUN_ONLY_FIELDS) >= {"num_workers", "eval_every", "checkpoint_every", "keep_checkpoints"}
    # Progress bars are display only: switching them off never blocks a resume.
    assert check_resume(saved, _cfg(ckpt, progress=not json.loads(saved)["progress"])) == {}
    # A config saved before a field existed counts as that field's default.
    older = json.loads(saved)
    del older["kl_variant"]
    assert check_resume(older, _cfg(ckpt)) == {}
    with pytest.raises(ValueError, match="not saved"):
        check_resume(None, _cfg(ckpt))


def test_finished_run_is_reused_only_with_the_same_config(ckpt, tmp_path):
    cfg = _cfg(ckpt, out_dir=str(tmp_path / "run"))
    assert finished_run(cfg) is None
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(cfg.to_json())
    (tmp_path / "run" / "final_eval.json").write_text(json.dumps({"score": 12.5}))
    assert finished_run(dataclasses.replace(cfg, num_workers=3)) == {"score": 12.5}  # run-only: same experiment
    with pytest.raises(ValueError, match="seed: 42 there, 7 now"):
        finished_run(dataclasses.replace(cfg, seed=7))
    # A started (checkpointed) run is checked too, even before it finishes.
    (tmp_path / "run" / "final_eval.json").unlink()
    (tmp_path / "run" / "checkpoints" / "4").mkdir(parents=True)
    assert finished_run(cfg) is None
    with pytest.raises(ValueError, match="learning_rate"):
        finished_run(dataclasses.replace(cfg, learning_rate=1.0))


def test_restore_refuses_a_state_of_another_model(tmp_path):
    small = init_params(CFG, jax.random.PRNGKey(0))
    other = init_params(dataclasses.replace(CFG, hidden_size=48), jax.random.PRNGKey(0))
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, small, {"next_step": 2})
        assert ckpt.extra() == {"next_step": 2}
        with pytest.raises(ValueError, match=r"(?s)another model.*\['embed'\]: saved \(300, 32\) float32, expected "
                                             r"\(300, 48\)"):
            ckpt.restore(other)
        with pytest.raises(ValueError, match="another model or optimizer|another structure"):
            ckpt.restore({"embed": small["embed"]})
        restored, _ = ckpt.restore(small)
    np.testing.assert_array_equal(restored["embed"], small["embed"])


# ---- item 3: the stop after consecutive non-finite steps (end to end in test_runner_failures.py) ------------------

def test_count_skips_stops_after_three_fully_skipped_steps():
    from gopd_jax.train import count_skips

    n = 0
    for skipped in (1.0, 1.0, 0.0, 0.5, 1.0, 1.0):  # a good step resets; a partly skipped step is not skipped
        n = count_skips(n, skipped)
    assert n == 2
    with pytest.raises(FloatingPointError, match="3 consecutive steps"):
        count_skips(n, 1.0)


# ---- item 9: a log line cut off by a kill -----------------------------------------------------------------------

def test_cut_off_last_log_line_is_dropped_with_a_warning(tmp_path):
    log = tmp_path / TRAIN_LOG
    log.write_text(json.dumps({"step": 0, "loss": 1.0}) + "\n" + json.dumps({"step": 1, "loss": 0.5}) + "\n"
                   + '{"step": 2, "lo')
    with pytest.warns(UserWarning, match="cut-off last line"):
        assert read_jsonl(log) == [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}]
    with pytest.warns(UserWarning):
        logger = MetricsLogger(tmp_path, resume_from=2)  # the resume that used to fail
    logger.close()
    assert [r["step"] for r in read_jsonl(log)] == [0, 1]
    assert log.read_text().endswith("\n")
    (tmp_path / EVAL_LOG).write_text('{"step": 2}\n{"st\n{"step": 4}\n')
    with pytest.raises(ValueError, match=f"{EVAL_LOG}: line 2 is not JSON"):
        read_jsonl(tmp_path / EVAL_LOG)


# ---- item 8: a damaged ALFWorld archive -------------------------------------------------------------------------

def _xz_archive(path: Path) -> bytes:
    data = os.urandom(20_000)  # incompressible, so a cut lands inside the compressed stream
    with tarfile.open(path, "w:xz") as tar:
        info = tarfile.TarInfo("json_2.1.1/train/x/y/game.tw-pddl")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_archive_names_the_path_and_the_fix(tmp_path, damage):
    archive = tmp_path / "json_2.1.1.tar.xz"
    data = _xz_archive(archive)
    archive.write_bytes(b"this is not an xz file" * 10 if damage == "garbage" else data[:len(data) // 2])
    with pytest.raises(RuntimeError, match="cannot unpack the ALFWorld archive") as info:
        _unpack_once(archive, tmp_path / "cache")
    assert str(archive) in str(info.value) and "alfworld-download" in str(info.value)
    assert not (tmp_path / "cache").exists() and [p.name for p in tmp_path.iterdir()] == [archive.name]


def test_intact_archive_unpacks(tmp_path):
    archive = tmp_path / "a.tar.xz"
    _xz_archive(archive)
    _unpack_once(archive, tmp_path / "cache")
    assert (tmp_path / "cache" / "json_2.1.1" / "train" / "x" / "y" / "game.tw-pddl").stat().st_size == 20_000


# ---- item 11: a worker that dies while starting -----------------------------------------------------------------

def test_worker_dying_at_start_reports_its_own_error(tmp_path):
    """A script without a __main__ guard: spawned workers re-run it and die before running any pool code.
    The parent's error must carry the worker's own exception and say what to fix."""
    script = tmp_path / "no_guard.py"
    script.write_text(textwrap.dedent("""
        from gopd_jax.envs import EnvPool

        EnvPool("alfworld", num_workers=1)
        print("pool started")
    """))
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path / "tmp")}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "pool started" not in proc.stdout
    marker = "RuntimeError: alfworld worker 0 failed to start"
    assert marker in proc.stderr, proc.stderr[-3000:]
    parent = proc.stderr[proc.stderr.index(marker):]  # the parent's error (workers print their own above it)
    assert 'has no `if __name__ == "__main__":` guard' in parent
    assert "its error while starting" in parent and "bootstrapping phase" in parent
    assert not list((tmp_path / "tmp").iterdir())  # the workers' report files are cleaned up


def test_worker_busy_with_an_unguarded_script_times_out_naming_the_guard(tmp_path):
    """An unguarded script that works (here: sleeps) before it starts its pool: each spawned worker repeats
    that work and cannot answer in time. The parent's error must say why, not just "timed out"."""
    script = tmp_path / "slow_no_guard.py"
    script.write_text(textwrap.dedent("""
        import time

        import gopd_jax.envs.pool as pool

        pool._STARTUP_ALLOWANCE_S = 2.0  # the real allowance is minutes
        time.sleep(6)  # stands in for the training a real script does before it evaluates
        pool.EnvPool("alfworld", num_workers=1)
        print("pool started")
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "pool started" not in proc.stdout
    marker = "RuntimeError: alfworld worker 0 failed to start"
    assert marker in proc.stderr, proc.stderr[-3000:]
    parent = proc.stderr[proc.stderr.index(marker):]
    assert "no answer within 2 s of its start" in parent and 'if __name__ == "__main__":' in parent
