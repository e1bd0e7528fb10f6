"""alfworld_replay_bench (recorded real ALFWorld episodes) and a tiny-shape run of experiments.bench_step."""
import numpy as np
import pytest

from gopd_jax.envs import ENV_NAMES, list_tasks, make_env
from gopd_jax.envs.replay import find_recording, load_recording
from gopd_jax.experiment import ExperimentConfig


@pytest.fixture(scope="module")
def tasks():
    return list_tasks("alfworld_replay_bench", "valid_unseen")


def test_replay_follows_the_recorded_engine(tasks):
    assert len(tasks) >= 6 and len({t.task_type for t in tasks}) == 6  # every ALFWorld task type
    env = make_env("alfworld_replay_bench", realtime=False)
    game = load_recording(str(find_recording(None).resolve()))[0]
    goal, first = env.reset(tasks[0])
    assert goal == game["goal"] and first.observation == game["states"][0]["observation"]
    assert first.admissible_actions and not first.done
    look = env.step("look")
    assert look.observation == game["states"][0]["other"][0]["observation"] and not look.done
    miss = env.step("dance with the fridge")
    assert miss.observation == "Nothing happens." and miss.admissible_actions == first.admissible_actions
    actions = env.expert_actions()
    assert actions == [s["action"] for s in game["states"][1:]]
    for i, action in enumerate(actions):
        res = env.step(action)
        assert res.observation == game["states"][i + 1]["observation"]
        assert res.done == (i == len(actions) - 1)
    assert res.won and res.score == 100.0


def test_replay_is_never_an_experiment_environment():
    assert ExperimentConfig.__dataclass_fields__["env"].default == "alfworld"
    assert "alfworld_replay_bench" not in ENV_NAMES
    with pytest.raises(ValueError, match="unknown environment 'alfworld_replay_bench'"):
        ExperimentConfig(env="alfworld_replay_bench").validate()


@pytest.mark.multidevice
@pytest.mark.timeout(600)
def test_bench_step_smoke_sharded_moe_teacher_and_fsdp_student(capsys):
    """The paper's loop shape on 4 simulated devices: expert-parallel MoE teacher, FSDP student update."""
    pytest.importorskip("transformers")
    from experiments import bench_step

    try:
        bench_step.qwen3_tokenizer()
    except FileNotFoundError as e:
        pytest.skip(f"real Qwen3 tokenizer not on this machine: {e}")
    out = bench_step.main(["--teacher", "tiny", "--student", "tiny", "--tasks", "2", "--workers", "2",
                           "--max-turns", "2", "--max-new-tokens", "4", "--max-prompt-tokens", "200",
                           "--beta", "0.5", "--steps", "1", "--no-realtime", "--teacher-layout", "expert",
                           "--student-update", "fsdp"])
    step = out["steps"][-1]
    assert (out["plan"].teacher_layout, out["plan"].student_update) == ("expert", "fsdp")
    assert step["turns"] == 4 and step["width"] == 256 and np.isfinite(step["loss"])
    assert step["teacher_gen"] + step["student_gen"] > 0 and step["update"] > 0 and step["scoring"] > 0
    assert out["projected_s"] > 0
    printed = capsys.readouterr().out
    assert "device plan" in printed and "projected 250 steps" in printed


def test_projection_follows_the_curriculum():
    from experiments.bench_step import projected_paper_seconds

    step = {"total": 10.0, "teacher_gen": 4.0, "student_gen": 3.0, "scoring": 1.0}
    beta_sum = sum(0.5 * (1 + np.cos(np.pi * min(s / 200, 1.0))) for s in range(250))  # cosine to 0 at 0.8 * 250
    # per step: 3 s fixed + beta_s * 8 s (teacher at full share) + (1 - beta_s) * 6 s (student)
    expected = 250 * 3 + 250 * 6 + 2 * beta_sum
    np.testing.assert_allclose(projected_paper_seconds(step, 0.5), expected, rtol=1e-5)
    np.testing.assert_allclose(projected_paper_seconds(step, 0.5, turn_scale=2.0), 2 * expected, rtol=1e-5)
    # teacher 4x deeper: its generation x4 and scoring + 3 s
    np.testing.assert_allclose(projected_paper_seconds(step, 0.5, teacher_scale=4.0),
                               expected + 250 * 3 + 24 * beta_sum, rtol=1e-5)
