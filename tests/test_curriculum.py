import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gopd_jax import curriculum as cur


@pytest.mark.parametrize("n", [100, 250])
def test_cosine_to_zero_values(n):
    s = cur.cosine_to_zero(n, rho=0.8)
    assert float(s(0)) == 1.0
    assert float(s(int(0.4 * n))) == pytest.approx(0.5, abs=1e-6)
    assert float(s(int(0.8 * n))) == 0.0
    assert float(s(n)) == 0.0
    # The design formula 0.5 * (1 + cos(pi * min(s / (rho N), 1))).
    for step in range(0, n + 1, 7):
        ref = 0.5 * (1 + math.cos(math.pi * min(step / int(0.8 * n), 1.0)))
        assert float(s(step)) == pytest.approx(ref, abs=1e-6)


def test_cosine_is_the_optax_schedule():
    s, ref = cur.cosine_to_zero(250), optax.cosine_decay_schedule(1.0, 200, alpha=0.0)
    steps = jnp.arange(260)
    np.testing.assert_array_equal(jax.vmap(s)(steps), jax.vmap(ref)(steps))


def test_linear_and_constant():
    s = cur.linear_to_zero(100, rho=0.5)
    assert [float(s(i)) for i in (0, 25, 50, 80)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    c = cur.constant(0.3)
    assert float(c(0)) == pytest.approx(0.3) and float(c(10_000)) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        cur.constant(1.5)
    with pytest.raises(ValueError):
        cur.cosine_to_zero(0)


def test_as_curriculum_and_beta_at():
    assert float(cur.beta_at(cur.as_curriculum(0.25), 3)) == pytest.approx(0.25)
    piecewise = optax.piecewise_constant_schedule(1.0, {10: 0.5, 20: 0.0})
    assert cur.as_curriculum(piecewise) is piecewise
    assert [float(cur.beta_at(piecewise, i)) for i in (0, 15, 25)] == [1.0, 0.5, 0.0]
    # Values are clipped to [0, 1].
    assert float(cur.beta_at(lambda step: 2.0, 0)) == 1.0
    assert float(cur.beta_at(optax.linear_schedule(0.5, -1.0, 10), 10)) == 0.0
    with pytest.raises(TypeError):
        cur.as_curriculum("cosine")
    # jittable with a traced step
    assert float(jax.jit(lambda s: cur.beta_at(cur.cosine_to_zero(100), s))(40)) == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_owner_frequencies(beta):
    n = 200_000
    owners = cur.draw_owners(jax.random.PRNGKey(0), beta, (n,))
    assert owners.dtype == jnp.bool_ and owners.shape == (n,)
    freq = float(jnp.mean(owners))
    sigma = math.sqrt(beta * (1 - beta) / n)
    assert abs(freq - beta) <= 4 * sigma + 1e-12


def test_owners_deterministic_and_jittable():
    key = jax.random.PRNGKey(7)
    a = cur.draw_owners(key, 0.5, (8, 30))
    b = jax.jit(cur.draw_owners, static_argnums=2)(key, jnp.float32(0.5), (8, 30))
    np.testing.assert_array_equal(a, b)
    c = cur.draw_owners(jax.random.PRNGKey(8), 0.5, (8, 30))
    assert not np.array_equal(a, c)


def test_tcod_depth():
    s = cur.tcod_depth(100, max_turns=30, rho=0.8)
    assert float(s(0)) == 1.0 and float(s(80)) == 30.0 and float(s(100)) == 30.0
    depths = [int(cur.depth_at(s, i)) for i in range(101)]
    assert depths[0] == 1 and depths[-1] == 30
    assert all(a <= b for a, b in zip(depths, depths[1:]))
    assert int(cur.depth_at(s, 40)) == int(1 + 29 * 0.5)
    with pytest.raises(ValueError):
        cur.tcod_depth(100, max_turns=5, start=6)
