"""Update step: pmap over 4 simulated CPU devices == single device; accumulation; non-finite skip."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gopd_jax import train
from gopd_jax.models import Qwen3Config, init_params

CFG = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)
N_DEV = 4


def make_batch(seed, b=8, t=16, prompt=4):
    """Random tokens; loss on positions >= prompt in every row (equal token counts per row)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CFG.vocab_size, (b, t)).astype(np.int32)
    targets = np.concatenate([tokens[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
    mask = np.zeros((b, t), np.float32)
    mask[:, prompt:t - 1] = 1.0
    return {"tokens": tokens, "targets": targets, "loss_mask": mask}


def new_state(lr=1e-2):
    opt = train.make_optimizer(lr)
    return opt, train.init_train_state(init_params(CFG, jax.random.PRNGKey(0)), opt, jax.random.PRNGKey(1))


LOSS = functools.partial(train.sft_loss_fn, config=CFG, chunk=8)


def assert_trees_close(a, b, tol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)


@pytest.mark.multidevice
@pytest.mark.timeout(300)
def test_pmap_matches_single_device():
    assert len(jax.local_devices()) >= N_DEV, "conftest should simulate 4 CPU devices"
    opt, state = new_state()
    single = train.jit_update_step(LOSS, opt)
    devices = jax.local_devices()[:N_DEV]
    multi = train.pmap_update_step(LOSS, opt, devices=devices)

    ref_state, pm_state = state, train.replicate(state, devices)
    for i in range(2):
        batch = make_batch(i)
        ref_state, ref_m = jax.block_until_ready(single(ref_state, batch))
        pm_state, pm_m = jax.block_until_ready(multi(pm_state, train.shard_batch(batch, N_DEV)))
        np.testing.assert_allclose(np.asarray(pm_m["loss"]), float(ref_m["loss"]), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(pm_m["grad_norm"]), float(ref_m["grad_norm"]), rtol=1e-5)
        # counts are summed over devices, not averaged
        np.testing.assert_allclose(np.asarray(pm_m["n_tokens"]), float(ref_m["n_tokens"]))
    host = train.unreplicate(pm_state)
    assert int(host.step) == int(ref_state.step) == 2
    assert_trees_close(host.params, ref_state.params)
    assert_trees_close(host.opt_state, ref_state.opt_state)
    # replicas stay identical
    for leaf in jax.tree.leaves(pm_state.params):
        shards = [np.asarray(s.data) for s in leaf.addressable_shards]
        assert all(np.array_equal(shards[0], s) for s in shards[1:])


@pytest.mark.timeout(300)
def test_accumulation_matches_full_batch():
    opt, state = new_state()
    full = train.jit_update_step(LOSS, opt)
    accum = train.jit_update_step(LOSS, opt, accum_steps=2)
    s1, s2 = state, jax.tree.map(jnp.copy, state)
    for i in range(2):
        s1, m1 = full(s1, make_batch(i))
        s2, m2 = accum(s2, make_batch(i))
        np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
    assert_trees_close(s1.params, s2.params)


def test_accumulation_needs_divisible_batch():
    opt, state = new_state()
    with pytest.raises(ValueError, match="accum_steps=3"):
        train.jit_update_step(LOSS, opt, accum_steps=3)(state, make_batch(0))


def test_shard_batch_shapes_and_error():
    sharded = train.shard_batch(make_batch(0), 4)
    assert sharded["tokens"].shape == (4, 2, 16)
    with pytest.raises(ValueError, match="not divisible by the 3 devices"):
        train.shard_batch(make_batch(0), 3)


@pytest.mark.timeout(300)
def test_non_finite_step_is_skipped():
    opt, state = new_state()
    step = train.jit_update_step(LOSS, opt)
    state, m = step(state, make_batch(0))
    assert float(m["skipped"]) == 0.0
    before = jax.tree.map(np.asarray, state)

    bad = make_batch(1)
    bad["loss_mask"][0, 5] = np.nan
    state, m = step(state, bad)
    assert float(m["skipped"]) == 1.0 and not np.isfinite(float(m["loss"]))
    assert int(state.step) == 2  # attempted steps still count
    assert_trees_close(state.params, before.params, tol=0)
    assert_trees_close(state.opt_state, before.opt_state, tol=0)

    state, m = step(state, make_batch(2))  # training carries on
    assert float(m["skipped"]) == 0.0 and np.isfinite(float(m["loss"]))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))


@pytest.mark.multidevice
@pytest.mark.timeout(300)
def test_traced_loss_kwargs_pass_through():
    """Extra dynamic arguments (e.g. the curriculum's beta) reach loss_fn on one and many devices."""
    def scaled(params, batch, scale):
        loss, metrics = LOSS(params, batch)
        return scale * loss, metrics

    opt, state = new_state()
    devices = jax.local_devices()[:N_DEV]
    batch = make_batch(0)
    replicated = train.replicate(state, devices)
    _, mp = jax.block_until_ready(train.pmap_update_step(scaled, opt, devices=devices)(
        replicated, train.shard_batch(batch, N_DEV), scale=3.0))
    _, m1 = train.jit_update_step(scaled, opt)(jax.tree.map(jnp.copy, state), batch, scale=1.0)
    _, m3 = train.jit_update_step(scaled, opt)(state, batch, scale=jnp.float32(3.0))  # donates state
    np.testing.assert_allclose(float(m3["loss"]), 3 * float(m1["loss"]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(mp["loss"]), float(m3["loss"]), rtol=1e-5)


def test_compute_dtype_keeps_float32_master_params():
    opt, state = new_state()
    step = train.jit_update_step(train.with_compute_dtype(LOSS, jnp.bfloat16), opt)
    state, m = step(state, make_batch(0))
    assert np.isfinite(float(m["loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
