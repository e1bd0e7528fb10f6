"""Batch building: the one padding rule, owner masks aligned with targets, PPO mini-batch splits."""

import numpy as np
import pytest

from gopd_jax.batch import bucket, mini_batches, normalise_masks, pad_rows, training_batch
from gopd_jax.envs import StepResult
from gopd_jax.records import STUDENT, TEACHER, Turn


def test_width_bucket_steps_by_half_octaves():
    from gopd_jax.batch import width_bucket

    widths = [width_bucket(n, 128) for n in range(1, 3000)]
    assert sorted(set(widths)) == [128, 256, 384, 512, 768, 1024, 1536, 2048, 3072]
    assert all(w >= n and (n <= 256 or w <= 1.5 * n) for n, w in enumerate(widths, 1))  # past 2x: <= 1/3 padding
    assert width_bucket(600, 256) == 768 and width_bucket(769, 256) == 1024


def test_bucket_is_multiple_times_a_power_of_two():
    assert [bucket(n, 8) for n in (1, 8, 9, 16, 17, 33)] == [8, 8, 16, 16, 32, 64]
    assert [bucket(n, 1) for n in (1, 2, 3, 5)] == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="n >= 1"):
        bucket(0, 4)


def _turn(owner, prompt, response, logp):
    return Turn(owner, np.asarray(prompt, np.int32), np.asarray(response, np.int32), np.asarray(logp, np.float32),
                "look", StepResult("", 0.0, False, False, []))


def test_training_batch_masks_targets_and_logprobs():
    turns = [_turn(STUDENT, [5, 6, 7], [8, 9], [-0.5, -0.25]), _turn(TEACHER, [5, 6], [3, 4, 2], [-1, -2, -3])]
    b = training_batch(turns, pad_id=0, row_multiple=4, min_width=4)
    assert b["tokens"].shape == (4, 8)  # width bucket(5, 4) = 8, rows bucket(2, 4) = 4
    np.testing.assert_array_equal(b["targets"][0][b["student_mask"][0] > 0], [8, 9])
    np.testing.assert_array_equal(b["targets"][1][b["teacher_mask"][1] > 0], [3, 4, 2])
    np.testing.assert_allclose(b["old_logprobs"][0][b["student_mask"][0] > 0], [-0.5, -0.25])
    assert b["old_logprobs"][1].sum() == 0  # the teacher's own log-probs are not p_S_old
    assert b["student_mask"][2:].sum() == b["teacher_mask"][2:].sum() == 0


def test_mini_batches_cover_every_real_row_once():
    rows = 7
    batch = pad_rows({"tokens": np.arange(rows)[:, None].repeat(3, 1), "student_mask": np.ones((rows, 3))}, 8)
    parts = mini_batches(batch, rows, 3, 2, np.random.default_rng(0))
    assert [p["tokens"].shape[0] for p in parts] == [4, 2, 2]  # 3, 2, 2 real rows, padded by bucket(., 2)
    seen = np.concatenate([p["tokens"][p["student_mask"].sum(1) > 0, 0] for p in parts])
    assert sorted(seen) == list(range(rows))
    with pytest.raises(ValueError, match="mini_batches"):
        mini_batches(batch, rows, 8, 2, np.random.default_rng(0))


def test_normalised_masks_sum_to_the_micro_batch_count():
    batch = {"student_mask": np.array([[1, 1, 0], [0, 1, 0]], np.float32), "teacher_mask": np.zeros((2, 3))}
    out = normalise_masks(batch, 4, "token_mean")
    assert out["student_mask"].sum() == pytest.approx(4.0) and out["teacher_mask"].sum() == 0
