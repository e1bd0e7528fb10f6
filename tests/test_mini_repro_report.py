"""The mini_repro results table from run files: intervals over games and seeds, the paired Guided-OPD - OPD
difference on the seeds both finished, baselines and per-task-type rows."""
import dataclasses
import json

import numpy as np
import pytest

from experiments import mini_repro
from gopd_jax import intervals
from tests.policies import alfworld_tokenizer

TYPES = ("pick_and_place_simple", "look_at_obj_in_light")


def _write_eval(run_dir, split, won):
    games = [{"game": f"{split}/g{i:03d}", "task_type": TYPES[i % 2], "won": bool(w), "score": 100.0 * w,
              "rounds": 10.0} for i, w in enumerate(won)]
    by_type = {t: {"success_rate": 100 * float(np.mean([g["won"] for g in games if g["task_type"] == t]))}
               for t in TYPES}
    summary = {"n": len(won), "score": 100 * float(np.mean(won)), "success_rate": 100 * float(np.mean(won)),
               "rounds": 10.0, "valid_action_rate": 40.0 + 20 * float(np.mean(won)), "by_task_type": by_type,
               # each file lists its games in its own order: the table must pair them by id
               "games": [games[i] for i in np.random.default_rng(len(run_dir.name)).permutation(len(games))]}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"full_eval_{split}.json").write_text(json.dumps(summary))


def test_results_table_reports_intervals_and_the_paired_difference(tmp_path):
    root = tmp_path / "runs"
    mini = dataclasses.replace(mini_repro.PRESETS["full"], out_dir=str(root), student_hidden=(48,),
                               seeds=(0, 1, 2), baselines=("sft",), baseline_seeds=(0,),
                               final_eval_splits=("valid_unseen", "valid_seen"))
    alfworld_tokenizer(root / "tokenizer")
    rng = np.random.default_rng(0)
    won = {}
    for name, p in [("teacher", 0.6), ("d48_warmup", 0.1), ("d48_sft_s0", 0.2)] + \
            [(f"d48_{m}_s{s}", p) for s in (0, 1, 2) for m, p in (("opd", 0.2), ("guided_opd", 0.3))]:
        won[name] = (rng.random(40) < p).astype(float)
        if name != "d48_opd_s2":  # seed 2 of OPD unfinished: seed 2 leaves the comparison
            _write_eval(root / name, "valid_unseen", won[name])
        _write_eval(root / name, "valid_seen", won[name][:10])
        if name == "d48_sft_s0":  # being evaluated: valid_seen not written yet, so not in the table
            (root / name / "full_eval_valid_seen.json").unlink()
        if "_s" in name:  # a distillation run's training log: the curves of comparison.png
            records = [{"step": i, "train_success": 100 * p, "student_valid_action_frac": 0.5,
                        "teacher_turn_frac": 0.5 / (i + 1), "kl_by_turn": [0.5, None, 0.3]} for i in range(4)]
            (root / name / "final_model").mkdir(parents=True, exist_ok=True)
            (root / name / "final_model" / "model.safetensors").write_bytes(b"weights")
            (root / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # The teacher's own SFT log, as in a live out-dir (export leaves it behind): not a distillation run's.
    (root / "teacher" / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1.0}) + "\n"
                                                            for i in range(30)))
    table = mini_repro.report(mini)
    assert (root / "comparison.png").stat().st_size > 0

    g = 100 * np.stack([won[f"d48_guided_opd_s{s}"] for s in (0, 1)])
    o = 100 * np.stack([won[f"d48_opd_s{s}"] for s in (0, 1)])
    assert str(intervals.paired_difference(g, o)) in table
    assert str(intervals.bootstrap(g)) in table and str(intervals.bootstrap(o)) in table
    assert "| guided_opd (2) |" in table and "| opd (2) |" in table and "| sft (" not in table
    assert str(intervals.bootstrap(100 * won["teacher"][None])) in table
    valid = 20 * (g.mean(axis=1) - o.mean(axis=1)) / 100  # per seed; valid_action_rate = 40 + 20 * success
    assert f"| {valid.mean():+.1f} ± {valid.std(ddof=1):.1f} |" in table
    assert (root / "results.md").read_text() == table
    # Training in step windows, per seed then over seeds: teacher turns = mean of 0.5 / (step + 1) over steps 0-3.
    assert "| student d48 | guided_opd | 0-3 | 30.0 ± 0.0 | 26 ± 0 | 0.400 ± 0.000 |" in table
    assert "| student d48 | opd | 0-3 | 20.0 ± 0.0 |" in table
    assert "| teacher (MoE) | SFT + 2 DAgger rounds | 0-" not in table
    assert "What the models do with their turns" not in table  # no evaluation kept an action profile

    # The committable copy (no weights, no unfinished run) rebuilds the same table and plot from its own files,
    # and keeps a model's expert agreement where one was measured.
    (root / "teacher" / "agreement.json").write_text('{"agreement": 80.0}')
    committed = tmp_path / "committed"
    assert mini_repro.export_results(mini, committed) == table
    assert (committed / "results.md").read_text() == table and (committed / "comparison.png").is_file()
    assert not list(committed.rglob("*.safetensors")) and not (committed / "d48_opd_s2").exists()
    assert json.loads((committed / "teacher" / "agreement.json").read_text()) == {"agreement": 80.0}


def test_action_table_pools_seeds_and_folds_rare_verbs(tmp_path):
    mini = dataclasses.replace(mini_repro.PRESETS["full"], out_dir=str(tmp_path), final_eval_splits=("valid_seen",))
    profiles = {"d48_opd_s0": {"go": {"turns": 60, "valid": 60, "repeats": 30},
                               "look": {"turns": 39, "valid": 39, "repeats": 38},
                               "inventory": {"turns": 1, "valid": 1, "repeats": 0}},
                "d48_opd_s1": {"go": {"turns": 40, "valid": 30, "repeats": 10},
                               "(none)": {"turns": 60, "valid": 0, "repeats": 0}},
                "d48_warmup": None,  # evaluated before the profile existed: left out
                "teacher": {"go": {"turns": 50, "valid": 50, "repeats": 0}}}
    for name, actions in profiles.items():
        _write_eval(tmp_path / name, "valid_seen", [1.0] * 10)
        if actions:
            path = tmp_path / name / "full_eval_valid_seen.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "actions": actions}))
    rows = [("teacher", 1, "SFT", ["teacher"]), ("student d48", 1, "warm-up", ["d48_warmup"]),
            ("student d48", 1, "opd", ["d48_opd_s0", "d48_opd_s1"])]
    lines = mini_repro.action_table(tmp_path, rows, mini, "valid_seen")
    # 200 turns over 20 games; go 100 (90 valid, 40 repeats), (none) 60, look 39 (38 repeats); inventory (1 of
    # s0's 100 turns, under 2% of every row) is "other".
    assert lines == [mini_repro.markdown_table(
        ["model", "method (seeds)", "turns a game", "valid %", "repeats %", "go", "(none)", "look", "other"],
        [["teacher", "SFT (1)", "5.0", "100.0", "0.0", "100.0 (100, 0)", "0.0", "0.0", "0.0"],
         ["student d48", "opd (2)", "10.0", "65.0", "39.0", "50.0 (90, 40)", "30.0 (0, 0)", "19.5 (100, 97)",
          "0.5 (100, 0)"]])]
    assert mini_repro.action_table(tmp_path, rows[1:2], mini, "valid_seen") == []


def test_set_overrides_a_presets_fields_and_names_the_known_ones():
    mini = mini_repro.override(mini_repro.PRESETS["full"], ["teacher_prompt_weight=0.1", "seeds=[3,4]",
                                                            "out_dir=runs/elsewhere"])
    assert (mini.teacher_prompt_weight, mini.seeds, mini.out_dir) == (0.1, (3, 4), "runs/elsewhere")
    with pytest.raises(SystemExit, match="teacher_prompt_weight"):
        mini_repro.override(mini, ["teacher_prompt_wieght=0.1"])


def test_final_evaluation_runs_every_game_of_each_split_once(tmp_path, monkeypatch):
    """Each split is evaluated whole (no game limit) at the final turn limit, with the run's shared settings, and a
    split already written is not evaluated again (the grid resumes)."""
    mini = dataclasses.replace(mini_repro.PRESETS["full"], out_dir=str(tmp_path), progress=False)
    calls = []

    def evaluate(cfg, checkpoint):  # stands in for the environment episodes: this test is about the orchestration
        calls.append((cfg, checkpoint))
        return {"n": 1, "split": cfg.eval_split}

    monkeypatch.setattr(mini_repro, "evaluate_checkpoint", evaluate)
    run_dir = tmp_path / "d64_opd_s0"
    run_dir.mkdir()
    (run_dir / "full_eval_valid_seen.json").write_text("{}")
    mini_repro.final_evaluation(mini, run_dir)
    ((cfg, checkpoint),) = calls
    assert checkpoint == str(run_dir / "final_model")
    assert (cfg.eval_split, cfg.eval_limit, cfg.max_turns, cfg.eval_temperature) == ("valid_unseen", 0,
                                                                                      mini.final_eval_turns, 0.4)
    assert (cfg.estimator, cfg.k_history, cfg.expert) == (mini.estimator, mini.k_history, mini.teacher_expert)
    assert json.loads((run_dir / "full_eval_valid_unseen.json").read_text()) == {"n": 1, "split": "valid_unseen"}
    assert (run_dir / "full_eval_valid_seen.json").read_text() == "{}"
    assert mini_repro._final_evals(mini, tmp_path, run_dir.name) == [{"n": 1, "split": "valid_unseen"}]

    # Another temperature: both splits again, into files of their own; the table at 0.4 reads only its own.
    hot = dataclasses.replace(mini, final_eval_temperature=1.0)
    calls.clear()
    mini_repro.final_evaluation(hot, run_dir)
    assert [(c.eval_split, c.eval_temperature) for c, _ in calls] == [("valid_unseen", 1.0), ("valid_seen", 1.0)]
    assert json.loads((run_dir / "full_eval_valid_seen_t1.json").read_text()) == {"n": 1, "split": "valid_seen"}
    assert mini_repro._final_evals(hot, tmp_path, run_dir.name, "valid_seen") == [{"n": 1, "split": "valid_seen"}]
    assert mini_repro._final_evals(mini, tmp_path, run_dir.name, "valid_seen") == [{}]


def test_a_finished_teacher_gets_the_whole_split_evaluations_it_lacks(tmp_path, monkeypatch):
    """Like a warm-up, a finished teacher is evaluated at a new final_eval_temperature (its missing files);
    offline (no environment) it is not."""
    mini = dataclasses.replace(mini_repro.PRESETS["full"], out_dir=str(tmp_path), final_eval_temperature=1.0)
    calls = []
    monkeypatch.setattr(mini_repro, "final_evaluation", lambda m, out: calls.append((m.final_eval_temperature, out)))
    out = tmp_path / "teacher"
    out.mkdir()
    (out / "final_eval.json").write_text("{}")
    vocab = range(mini.vocab_size)  # train_teacher reads only the tokenizer's length here
    assert mini_repro.train_teacher(mini, vocab, out) == str(out / "final_model")
    mini_repro.train_teacher(mini, vocab, out, offline=True)
    assert calls == [(1.0, out)]


def test_agreement_commands_name_the_missing_expert_corpus():
    # The quick preset builds no validation expert corpus: measuring an agreement there is a clear error.
    with pytest.raises(SystemExit, match="agreement_corpus_dir is not set"):
        mini_repro.required_agreement(mini_repro.PRESETS["quick"], None, None, None)
