"""Bootstrap intervals against closed forms (binomial standard error) and the pairing property."""
import numpy as np
import pytest

from gopd_jax.intervals import bootstrap, paired_difference


def test_one_seed_matches_the_binomial_normal_interval():
    rng = np.random.default_rng(0)
    won = (rng.random((1, 400)) < 0.3).astype(float)
    p = won.mean()
    half = 1.96 * np.sqrt(p * (1 - p) / won.size)
    ci = bootstrap(won, n=4000)
    assert ci.mean == pytest.approx(p)
    assert ci.low == pytest.approx(p - half, abs=0.012) and ci.high == pytest.approx(p + half, abs=0.012)


def test_seed_variation_widens_the_interval():
    """Three seeds that disagree (one wins everything) give a wider interval than three that agree."""
    rng = np.random.default_rng(1)
    agree = (rng.random((3, 134)) < 0.4).astype(float)
    disagree = agree.copy()
    disagree[0] = 1.0
    disagree[1] = 0.0
    w_agree = bootstrap(agree).high - bootstrap(agree).low
    w_disagree = bootstrap(disagree).high - bootstrap(disagree).low
    assert w_disagree > 2 * w_agree


def test_pairing_removes_shared_game_difficulty():
    """b is a plus a constant shift on each game's shared difficulty: the paired interval is tight around the
    shift, while the two unpaired intervals overlap."""
    rng = np.random.default_rng(2)
    difficulty = rng.random(134)
    a = np.tile(difficulty, (3, 1)) + rng.normal(0, 0.01, (3, 134))
    b = a - 0.05
    d = paired_difference(a, b)
    assert d.mean == pytest.approx(0.05) and d.low > 0.04 and d.high < 0.06
    assert bootstrap(b).high > bootstrap(a).low


def test_identical_arms_differ_by_exactly_zero():
    a = np.random.default_rng(3).random((3, 50))
    d = paired_difference(a, a)
    assert (d.mean, d.low, d.high) == (0.0, 0.0, 0.0)


def test_unpaired_shapes_are_refused():
    with pytest.raises(ValueError, match="same seeds and games"):
        paired_difference(np.zeros((3, 134)), np.zeros((2, 134)))
    with pytest.raises(ValueError, match="seeds, games"):
        bootstrap(np.zeros(5))
