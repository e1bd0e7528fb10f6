"""The offline expert corpus on real ALFWorld train games: resumable build, token-exact rendering, SFT batches."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("alfworld", reason="alfworld is not installed (pip install alfworld)")

from gopd_jax.envs import EnvPool, list_tasks  # noqa: E402
from gopd_jax.envs.prompting import build_messages  # noqa: E402
from gopd_jax.expert_corpus import (build_corpus, epoch_plan, iter_turns, load_corpus,  # noqa: E402
                                    render_corpus, sft_batch, sft_batches)
from gopd_jax.methods import owners_from_beta  # noqa: E402
from gopd_jax.records import EXPERT, STUDENT, TEACHER  # noqa: E402
from gopd_jax.rollout import RolloutConfig, RolloutRunner  # noqa: E402
from gopd_jax.tokenizer import train_bpe_tokenizer  # noqa: E402
from tests.policies import alfworld_data_available  # noqa: E402

GAMES = 3
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.skipif(not alfworld_data_available(), reason="ALFWorld game files not found (alfworld-download)")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus("alfworld", "train", tmp_path_factory.mktemp("corpus"), limit=GAMES, progress=False)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, corpus):
    texts = [m["content"] for t in iter_turns(load_corpus(corpus)) for m in
             build_messages(t.goal, list(t.history), t.observation, t.admissible_actions, "alfworld", think=False)]
    return train_bpe_tokenizer(texts, 400, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def pool():
    with EnvPool("alfworld", num_workers=1) as p:
        yield p


def test_corpus_holds_every_expert_turn(corpus):
    records = load_corpus(corpus)
    assert len(records) == GAMES and all(r["won"] for r in records)
    for r in records:
        assert r["goal"] and r["turns"] and r["game"].startswith("train/")
        for turn in r["turns"]:
            assert turn["action"] in turn["admissible_actions"]  # the walkthrough only takes admissible actions


def test_killed_build_resumes_to_the_same_corpus(corpus, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "gopd_jax.expert_corpus", "--out", str(out), "--limit", str(GAMES),
                             "--shard-games", "1", "--no-progress"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "shard-00000.jsonl").is_file():  # killed right after its first game is stored
            assert proc.poll() is None and time.monotonic() < deadline, "the build ended before storing a game"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = load_corpus(out)
    assert 1 <= len(partial) < GAMES
    build_corpus("alfworld", "train", out, limit=GAMES, shard_games=1, progress=False)
    assert load_corpus(out) == load_corpus(corpus)
    assert len(list(out.glob("shard-*.jsonl"))) == GAMES  # nothing replayed twice


def test_rebuild_with_other_settings_is_refused(corpus):
    with pytest.raises(ValueError, match="another directory"):
        build_corpus("alfworld", "train", corpus, limit=GAMES + 1, progress=False)


@pytest.mark.parametrize("think,max_prompt_tokens,memory", [(False, 10_240, False), (True, 260, False),
                                                             (False, 10_240, True)])
def test_rendered_ids_equal_what_the_rollout_feeds(corpus, tokenizer, pool, tmp_path, monkeypatch, think,
                                                   max_prompt_tokens, memory):
    cfg = RolloutConfig(env="alfworld", think=think, k_history=1 if memory else 2, max_prompt_tokens=max_prompt_tokens,
                        keep_first_observation=memory, earlier_actions=memory)
    rendered = render_corpus(corpus, tokenizer, cfg, cache_dir=tmp_path, progress=False)
    records = load_corpus(corpus)
    tasks = {task.game_id: task for task in list_tasks("alfworld", "train")}
    episodes, _ = RolloutRunner(pool, tokenizer, cfg).run([tasks[r["game"]] for r in records],
                                                          {STUDENT: EXPERT, TEACHER: EXPERT}, owners_from_beta(1.0),
                                                          jax.random.PRNGKey(0), progress=False)
    expected = {(e.task.game_id, i): (t.prompt_ids, t.response_ids) for e in episodes for i, t in enumerate(e.turns)}
    assert len(rendered) == len(expected) == sum(len(r["turns"]) for r in records)
    for i in range(len(rendered)):
        prompt, reply = rendered.row(i)
        want_prompt, want_reply = expected[(rendered.games[rendered.game_index[i]], int(rendered.turn[i]))]
        np.testing.assert_array_equal(prompt, want_prompt)
        np.testing.assert_array_equal(reply, want_reply)
    if max_prompt_tokens < 10_240:
        assert rendered.prompt_lengths.max() <= max_prompt_tokens
    # The second call reads the cache: same arrays, nothing rendered again.
    monkeypatch.setattr("gopd_jax.expert_corpus.render_turn", lambda *a, **k: pytest.fail("rendered again"))
    again = render_corpus(corpus, tokenizer, cfg, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(again.tokens, rendered.tokens)
    assert len(list(tmp_path.glob("*.npz"))) == len(list(corpus.glob("shard-*.jsonl")))


def test_loss_mask_covers_exactly_the_reply(corpus, tokenizer, tmp_path):
    cfg = RolloutConfig(env="alfworld", think=False)
    rendered = render_corpus(corpus, tokenizer, cfg, cache_dir=tmp_path, progress=False)
    rows = [0, len(rendered) - 1]
    batch = sft_batch(rendered, rows, batch_rows=4, width=1024)
    assert batch["tokens"].shape == batch["targets"].shape == batch["loss_mask"].shape == (4, 1024)
    for i, r in enumerate(rows):
        prompt, reply = rendered.row(r)
        m = batch["loss_mask"][i].astype(bool)
        np.testing.assert_array_equal(batch["targets"][i][m], reply)  # exactly the reply ids, in order
        assert np.flatnonzero(m).tolist() == list(range(len(prompt) - 1, len(prompt) + len(reply) - 1))
        np.testing.assert_array_equal(batch["tokens"][i, :len(prompt)], prompt)
        # The prompt mask: every target that is a prompt token (the first token is no target), nothing else.
        pm = batch["prompt_mask"][i].astype(bool)
        np.testing.assert_array_equal(batch["targets"][i][pm], prompt[1:])
        assert not (pm & m).any()
    assert not batch["loss_mask"][2:].any() and not batch["prompt_mask"][2:].any()  # empty rows carry no loss


def test_expert_agreement_counts_the_replies_greedy_decoding_reproduces(corpus, tokenizer, tmp_path):
    import functools

    import optax

    from gopd_jax.expert_corpus import expert_agreement
    from gopd_jax.models import Qwen3Config, forward_hidden, init_params, output_head
    from gopd_jax.train import init_train_state, jit_update_step, make_optimizer, sft_loss_fn

    rendered = render_corpus(corpus, tokenizer, RolloutConfig(env="alfworld", think=False), cache_dir=tmp_path,
                             progress=False)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    optimizer = make_optimizer(optax.constant_schedule(1e-2))
    state = init_train_state(init_params(config, jax.random.PRNGKey(0)), optimizer, jax.random.PRNGKey(0))
    update = jit_update_step(functools.partial(sft_loss_fn, config=config), optimizer)
    for _, (_, _, batch) in zip(range(40), sft_batches(rendered, 8192, seed=0)):
        state, _ = update(state, batch)  # fit these few games: some replies become exact, some not
    parity = ["even" if i % 2 == 0 else "odd" for i in range(len(rendered))]
    got = expert_agreement(state.params, config, rendered, tokens_per_batch=4096, labels={"parity": parity})
    hits, nll, n, row_hits = 0, 0.0, 0, []  # reference: each row alone, unpadded, float64
    for i in range(len(rendered)):
        prompt, reply = rendered.row(i)
        ids = np.concatenate([prompt, reply])[None]
        logits = forward_hidden(state.params, config, ids) @ output_head(state.params, config)
        logits = np.asarray(logits, np.float64)[0]
        pred = logits[len(prompt) - 1:-1]
        logp = pred - pred.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        row_hits.append(bool((pred.argmax(-1) == reply).all()))
        hits += row_hits[-1]
        nll, n = nll - logp[np.arange(len(reply)), reply].sum(), n + len(reply)
    assert got["turns"] == len(rendered) and 0 < hits < len(rendered)
    assert got["agreement"] == pytest.approx(100 * hits / len(rendered))
    assert got["reply_nll"] == pytest.approx(nll / n, rel=1e-4)
    types = [rendered.task_types[g] for g in rendered.game_index]
    for name, labels in (("task_type", types), ("parity", parity)):
        want = {k: [h for h, label in zip(row_hits, labels) if label == k] for k in set(labels)}
        assert got[f"by_{name}"] == {k: {"agreement": pytest.approx(100 * np.mean(v)), "turns": len(v)}
                                     for k, v in want.items()}
    with pytest.raises(ValueError, match="one label per row"):
        expert_agreement(state.params, config, rendered, tokens_per_batch=4096, labels={"parity": parity[1:]})


def test_epoch_plan_is_static_shaped_and_covers_each_row_once(corpus, tokenizer, tmp_path):
    rendered = render_corpus(corpus, tokenizer, RolloutConfig(env="alfworld", think=False), cache_dir=tmp_path,
                             progress=False)
    plan = epoch_plan(rendered, tokens_per_batch=4096, seed=0, epoch=0)
    rows = np.concatenate([r for _, r in plan])
    assert sorted(rows.tolist()) == list(range(len(rendered)))
    assert all(rendered.lengths[r].max() <= w for w, r in plan)
    assert epoch_plan(rendered, 4096, 0, 0)[0][1].tolist() == plan[0][1].tolist()  # a pure function of (seed, epoch)
    stream = sft_batches(rendered, 4096, seed=0)
    first = [next(stream) for _ in range(2 * len(plan) + 1)]
    assert {b["tokens"].shape for _, _, b in first} <= {(4096 // w, w) for w, _ in plan}
    assert [e for _, e, _ in first] == [0] * len(plan) + [1] * len(plan) + [2]
    # Resuming at step s (here inside the second epoch) yields the batch a fresh stream yields at step s.
    s = len(plan) + 1
    step, epoch, resumed = next(sft_batches(rendered, 4096, seed=0, start_step=s))
    assert (step, epoch) == (s, 1) and all(np.array_equal(resumed[k], first[s][2][k]) for k in resumed)


def test_a_packed_snapshot_seeds_a_fresh_build_without_replaying(corpus, tmp_path, monkeypatch):
    from gopd_jax import expert_corpus

    archive = expert_corpus.pack_snapshot(corpus, tmp_path / "snap.tar.xz")
    monkeypatch.setattr(expert_corpus, "EnvPool", None)  # a build that needed the engine would fail here
    out = build_corpus("alfworld", "train", tmp_path / "seeded", limit=GAMES, progress=False, snapshot=archive)
    assert load_corpus(out) == load_corpus(corpus)
    (tmp_path / "bad.tar.xz").write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="snapshot .*damaged"):
        build_corpus("alfworld", "train", tmp_path / "bad", limit=GAMES, progress=False, snapshot=tmp_path / "bad.tar.xz")


def test_the_shipped_alfworld_snapshot_holds_every_train_walkthrough(tmp_path):
    from experiments.mini_repro import SNAPSHOTS
    from gopd_jax.expert_corpus import unpack_snapshot

    unpack_snapshot(SNAPSHOTS["alfworld", "walkthrough"], tmp_path)
    records = load_corpus(tmp_path)
    assert {r["game"] for r in records} == {t.game_id for t in list_tasks("alfworld", "train")}
    assert len(records) == 3553 and all(r["won"] for r in records)


def test_the_shipped_handcoded_snapshot_replays_in_the_real_engine(tmp_path):
    """Every train game is in it; three seeded games' stored actions, played again in the engine, give the stored
    observations and outcome (the store is what the engine does, not a transcript of something else)."""
    from experiments.mini_repro import SNAPSHOTS
    from gopd_jax.envs.alfworld_env import AlfWorldEnv
    from gopd_jax.expert_corpus import corpus_meta, unpack_snapshot

    unpack_snapshot(SNAPSHOTS["alfworld", "handcoded"], tmp_path)
    assert corpus_meta(tmp_path)["env_kwargs"] == {"expert": "handcoded"}
    records = load_corpus(tmp_path)
    tasks = {t.game_id: t for t in list_tasks("alfworld", "train")}
    assert {r["game"] for r in records} == set(tasks)
    assert 0.6 < np.mean([r["won"] for r in records]) < 0.8  # it searches: 30 turns are not always enough
    env = AlfWorldEnv(expert="handcoded")
    for i in np.random.default_rng(0).choice(len(records), 3, replace=False):
        record = records[i]
        _, state = env.reset(tasks[record["game"]])
        for turn in record["turns"]:
            assert state.observation == turn["observation"] and turn["action"] == state.info["expert_action"]
            state = env.step(turn["action"])
        assert (state.won, state.observation) == (record["won"], record["final_observation"])
    env.close()
