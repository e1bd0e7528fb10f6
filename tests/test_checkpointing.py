"""Checkpoints: exact resume, keep-last-N, incomplete directories ignored, restore onto other device counts."""

import functools
import os

import jax
import numpy as np
import pytest

from gopd_jax import train
from gopd_jax.checkpointing import Checkpointer
from gopd_jax.models import Qwen3Config, init_params

CFG = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)
LOSS = functools.partial(train.sft_loss_fn, config=CFG, chunk=8)
OPT = train.make_optimizer(1e-2)


def fresh_state():
    return train.init_train_state(init_params(CFG, jax.random.PRNGKey(0)), OPT, jax.random.PRNGKey(42))


def batch_for(state, b=4, t=16):
    """Random tokens drawn from the state's key and step: a resumed run must restore both to match."""
    key = jax.random.fold_in(state.key, state.step)
    tokens = jax.random.randint(key, (b, t), 1, CFG.vocab_size, dtype=np.int32)
    targets = np.concatenate([np.asarray(tokens)[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
    return {"tokens": tokens, "targets": targets, "loss_mask": np.ones((b, t), np.float32)}


def run(state, step_fn, n):
    losses = []
    for _ in range(n):
        state, metrics = step_fn(state, batch_for(state))
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.mark.timeout(300)
def test_resume_reproduces_uninterrupted_run(tmp_path):
    step_fn = train.jit_update_step(LOSS, OPT)
    k, m = 2, 3
    full_state, full_losses = run(fresh_state(), step_fn, k + m)

    state, first = run(fresh_state(), step_fn, k)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(k, state, {"beta_step": k, "data_cursor": 17, "config": {"lr": 1e-2}})
    del state

    with Checkpointer(tmp_path) as ckpt:  # a new process would start here
        assert ckpt.latest_step() == k
        restored, extra = ckpt.restore(fresh_state())
    assert extra == {"beta_step": k, "data_cursor": 17, "config": {"lr": 1e-2}}
    assert isinstance(restored, train.TrainState) and int(restored.step) == k
    assert restored.key.dtype == np.uint32
    resumed_state, rest = run(restored, step_fn, m)

    assert first + rest == full_losses
    for a, b in zip(jax.tree.leaves(resumed_state), jax.tree.leaves(full_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_keeps_last_n_and_ignores_incomplete(tmp_path):
    state = fresh_state()
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, state, {"step": step})
        assert ckpt.all_steps() == [2, 3]
    # A save killed half-way leaves orbax's tmp directory behind (it is renamed only once complete).
    partial = tmp_path / "4.orbax-checkpoint-tmp-1700000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\0" * 10)
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() == 3
        _, extra = ckpt.restore(state)
        assert extra == {"step": 3}
    assert not partial.exists()  # cleaned up on start
    assert sorted(os.listdir(tmp_path)) == ["2", "3"]


def test_restore_without_checkpoint_raises(tmp_path):
    with Checkpointer(tmp_path / "empty") as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError):
            ckpt.restore(fresh_state())


@pytest.mark.multidevice
@pytest.mark.timeout(300)
def test_restore_onto_a_different_device_count(tmp_path):
    devices4, devices2 = jax.local_devices()[:4], jax.local_devices()[:2]
    state4 = train.replicate(fresh_state(), devices4)
    batch = batch_for(fresh_state(), b=4)
    state4, _ = jax.block_until_ready(train.pmap_update_step(LOSS, OPT, devices=devices4)(
        state4, train.shard_batch(batch, 4)))
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, train.unreplicate(state4))
        restored, _ = ckpt.restore(fresh_state())

    reference, ref_m = train.jit_update_step(LOSS, OPT)(restored, batch_for(restored))
    state2 = train.replicate(restored, devices2)
    state2, m2 = jax.block_until_ready(train.pmap_update_step(LOSS, OPT, devices=devices2)(
        state2, train.shard_batch(batch_for(restored), 2)))
    np.testing.assert_allclose(np.asarray(m2["loss"]), float(ref_m["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(train.unreplicate(state2)), jax.tree.leaves(reference)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
