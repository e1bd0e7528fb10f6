"""ALFWorld's handcoded (searching) expert through our adapter and rollout engine, and DAgger labels: checked
against ALFWorld's own task metadata and against the games themselves (the expert must win them)."""
import json
from pathlib import Path

import jax
import pytest

pytest.importorskip("alfworld", reason="alfworld is not installed (pip install alfworld)")

from gopd_jax import expert_corpus as ec  # noqa: E402
from gopd_jax.envs import EnvPool, list_tasks  # noqa: E402
from gopd_jax.envs.alfworld_env import task_params  # noqa: E402
from gopd_jax.evaluate import stratified_draw  # noqa: E402
from gopd_jax.methods import owners_from_beta  # noqa: E402
from gopd_jax.records import EXPERT, STUDENT, TEACHER, Policy  # noqa: E402
from gopd_jax.rollout import RolloutConfig, RolloutRunner  # noqa: E402
from tests.policies import alfworld_data_available, alfworld_tokenizer  # noqa: E402

pytestmark = pytest.mark.skipif(not alfworld_data_available(), reason="ALFWorld game files not found (alfworld-download)")


def test_task_params_from_the_folder_name_match_alfreds_traj_data(tmp_path):
    """Train games ship without traj_data.json; the folder name must give the same parameters where there is one."""
    games = [Path(t.task_id) for split in ("valid_seen", "valid_unseen") for t in list_tasks("alfworld", split)]
    assert len(games) == 274
    for game in games:
        traj = json.loads((game.parent / "traj_data.json").read_text())
        bare = tmp_path / game.parent.parent.parent.name / game.parent.parent.name / game.parent.name / game.name
        bare.parent.mkdir(parents=True)  # the same folders, no traj_data.json
        assert task_params(str(bare)) == {**traj["pddl_params"], "task_type": traj["task_type"]}, game
        assert task_params(str(game)) == {**traj["pddl_params"], "task_type": traj["task_type"]}


@pytest.fixture(scope="module")
def pool():
    with EnvPool("alfworld", {"expert": "handcoded"}, num_workers=2) as p:
        yield p


def test_unknown_expert_is_refused():
    from gopd_jax.envs.alfworld_env import AlfWorldEnv

    with pytest.raises(ValueError, match="handcoded"):
        AlfWorldEnv(expert="oracle")


@pytest.mark.parametrize("split", ["train", "valid_unseen"])
def test_the_handcoded_expert_wins_games_through_the_rollout(pool, split):
    """It plays from the state the episode is in (no plan fixed at reset): most games won, every action admissible,
    and on train games too (their task parameters come from the folder name)."""
    tasks = stratified_draw(list_tasks("alfworld", split), 12, seed=7)
    runner = RolloutRunner(pool, None, RolloutConfig(env="alfworld", max_turns=50))
    episodes, _ = runner.run(tasks, {STUDENT: EXPERT, TEACHER: EXPERT}, owners_from_beta(1.0), jax.random.PRNGKey(0),
                             progress=False)
    assert sum(e.result.won for e in episodes) >= 8
    assert all(e.result.inadmissible_actions == 0 and e.result.invalid_actions == 0 for e in episodes)
    assert all(t.valid for e in episodes for t in e.turns)  # each turn judged against the state it was played from
    # It searches (it cannot see inside receptacles), so it needs more turns than the stored walkthroughs.
    walkthrough = [len(json.loads(Path(e.task.task_id).read_text())["walkthrough"]) for e in episodes]
    assert sum(e.result.rounds for e in episodes) > sum(walkthrough)


def test_dagger_labels_every_state_the_model_reaches(pool, tmp_path):
    """A random model plays with the expert taking half the turns: every state, invalid turns included, is
    labelled with the expert's admissible action for it; the history keeps the actions played."""
    from experiments.mini_repro import _dense
    from gopd_jax.models import init_params

    tok = alfworld_tokenizer(tmp_path / "tok")
    tasks = stratified_draw(list_tasks("alfworld", "train"), 2, seed=3)
    runner = RolloutRunner(pool, tok, RolloutConfig(env="alfworld", max_turns=8, max_new_tokens=8, think=False,
                                                    k_history=1))
    config = _dense(len(tok), 32, 1)
    policy = Policy(init_params(config, jax.random.PRNGKey(0)), config)
    records = list(ec.play_episodes(runner, tasks, {STUDENT: policy, TEACHER: EXPERT}, owners_from_beta(0.5),
                                    jax.random.PRNGKey(0), labelled=True))
    assert len(records) == 2 and all(r["labelled"] for r in records)
    turns = [t for r in records for t in r["turns"]]
    assert all(t["label"] in t["admissible_actions"] for t in turns)
    assert any(t["action"] != t["label"] for t in turns)  # the model strayed, the label says what to do there
    rows = list(ec.iter_turns(records))
    assert [r.action for r in rows] == [t["label"] for t in turns]
    assert [h[1] for h in rows[-1].history] == [t["action"] for t in records[-1]["turns"][:-1]]


def test_evaluate_expert_plays_the_expert_asked_for():
    from gopd_jax.evaluate import evaluate_expert

    kw = dict(limit=2, num_workers=1, seed=4)
    walkthrough = evaluate_expert("alfworld", "valid_unseen", **kw)
    handcoded = evaluate_expert("alfworld", "valid_unseen", expert="handcoded", max_turns=6, **kw)
    assert walkthrough["success_rate"] == 100.0
    assert handcoded["rounds"] <= 6 and handcoded["rounds"] != walkthrough["rounds"]
