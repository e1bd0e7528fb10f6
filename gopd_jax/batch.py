"""From rollout turns to the arrays the update step consumes: rows, owner masks, padding, normalisation.

Token in, token out: a row is the exact prompt ids a model was fed plus the exact ids it sampled. Two padding
rules serve every shape that gets compiled (``bucket`` for rows, ``width_bucket`` for widths), so a run compiles
a handful of shapes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from gopd_jax.records import STUDENT, Turn

OWNER_MASKS = ("student_mask", "teacher_mask")


def bucket(n: int, multiple: int) -> int:
    """The padded size for n: the smallest multiple * 2^k >= n (k >= 0)."""
    if n < 1 or multiple < 1:
        raise ValueError(f"bucket needs n >= 1 and multiple >= 1, got n={n}, multiple={multiple}")
    return multiple * (1 << max(0, (-(-n // multiple) - 1).bit_length()))


def width_bucket(n: int, multiple: int) -> int:
    """The padded width for n tokens: the smallest of multiple * 2^k and 3 * multiple * 2^k >= n (multiple,
    2x, 3x, 4x, 6x, 8x, 12x, ...). Past 2x, half-octave steps pad at most a third of a row, not half of it, for
    twice the handful of compiled shapes: a 600-token prompt runs at 768 rather than 1024."""
    b = bucket(n, multiple)
    return b * 3 // 4 if b >= 4 * multiple and b * 3 // 4 >= n else b


def pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Append empty (all-zero) rows up to `rows`: they carry no mask, hence no loss and no metric."""
    have = next(iter(batch.values())).shape[0]
    if rows < have:
        raise ValueError(f"cannot pad {have} rows down to {rows}")
    return {k: np.concatenate([v, np.zeros((rows - have, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def training_batch(turns: Sequence[Turn], *, pad_id: int = 0, row_multiple: int = 1, min_width: int = 128,
                   max_len: int | None = None) -> dict[str, np.ndarray]:
    """One row per turn: prompt ids + response ids, right padded: rows by ``bucket``, width by ``width_bucket``.

    Masks mark the response tokens of student-owned and teacher-owned turns (aligned with ``targets``, the
    next-token ids); prompt and padding positions carry no mask. ``old_logprobs`` holds the student's
    sampling log-probs on its own tokens (the PPO ratio's denominator) and 0 elsewhere; what the loss needs
    from the models on top of that is filled by ``scoring.score_batch``.
    """
    if not turns:
        raise ValueError("training_batch needs at least one turn")
    lengths = [len(t.prompt_ids) + len(t.response_ids) for t in turns]
    width = width_bucket(max(lengths), min_width)
    if max_len is not None and width > max_len:
        raise ValueError(f"a turn has {max(lengths)} tokens, more than max_len={max_len}; raise max_len or lower "
                         "max_prompt_tokens / max_new_tokens")
    rows = bucket(len(turns), row_multiple)
    tokens = np.full((rows, width), pad_id, np.int32)
    student, teacher, old = (np.zeros((rows, width), np.float32) for _ in range(3))
    for i, turn in enumerate(turns):
        p, r = len(turn.prompt_ids), len(turn.response_ids)
        tokens[i, :p + r] = np.concatenate([turn.prompt_ids, turn.response_ids])
        # targets[:, t] = tokens[:, t + 1]: the response occupies targets p-1 .. p+r-2.
        if turn.owner == STUDENT:
            student[i, p - 1:p + r - 1] = 1.0
            old[i, p - 1:p + r - 1] = turn.logprobs
        else:
            teacher[i, p - 1:p + r - 1] = 1.0
    targets = np.concatenate([tokens[:, 1:], np.full((rows, 1), pad_id, np.int32)], axis=1)
    return {"tokens": tokens, "targets": targets, "student_mask": student, "teacher_mask": teacher,
            "old_logprobs": old}


def mini_batches(batch: dict[str, np.ndarray], n_rows: int, n_mini: int, row_multiple: int,
                 rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """PPO mini-batches: the first `n_rows` (real) rows shuffled and split into `n_mini` near-equal parts,
    each padded with empty rows to ``bucket(part, row_multiple)``."""
    if not 1 <= n_mini <= n_rows:
        raise ValueError(f"need 1 <= mini_batches <= rows in the batch, got {n_mini} mini-batches for {n_rows} rows")
    order = rng.permutation(n_rows) if n_mini > 1 else np.arange(n_rows)
    parts = np.array_split(order, n_mini)
    return [pad_rows({k: v[idx] for k, v in batch.items()}, bucket(len(idx), row_multiple)) for idx in parts]


def normalise_masks(batch: dict[str, np.ndarray], n_micro: int, aggregation: str) -> dict[str, np.ndarray]:
    """Turn each owner's 0/1 mask into weights such that the update step's mean over `n_micro`
    micro-batches of weighted sums is the token (or sequence) mean over the whole batch."""
    out = dict(batch)
    for name in OWNER_MASKS:
        mask = batch[name]
        if aggregation == "sequence_mean":
            per_row = mask.sum(1, keepdims=True)
            mask, total = mask / np.maximum(per_row, 1.0), float((per_row > 0).sum())
        else:
            total = float(mask.sum())
        out[name] = mask * (n_micro / total if total else 0.0)
    return out


def kl_by_turn(turns: Sequence[Turn], batch: dict[str, np.ndarray], max_turns: int) -> list[float | None]:
    """Mean sampled teacher-student KL (log p_S_old - log p_T per token) of student turns, by turn index;
    row i of `batch` must be `turns[i]`."""
    sums, counts = defaultdict(float), defaultdict(float)
    for i, turn in enumerate(turns):
        m = batch["student_mask"][i]
        if m.sum():
            sums[turn.index] += float(((batch["old_logprobs"][i] - batch["teacher_logprobs"][i]) * m).sum())
            counts[turn.index] += float(m.sum())
    return [sums[t] / counts[t] if counts[t] else None for t in range(max_turns)]
