"""Owner-masked distillation losses (docs/PAPER.md §2), pure and jittable.

Batch layout (docs/CONTRACTS.md): ``targets``, ``student_mask``, ``teacher_mask``, ``old_logprobs`` and
``teacher_logprobs`` are all [B, T]; position t of the hidden states predicts ``targets[:, t]``.

The vocabulary is large (151,936), so the losses take final hidden states [B, T, D] and an output head
[D, V] and form float32 logits one time-chunk at a time inside a rematerialised ``lax.map``: neither the
forward nor the backward pass ever holds a [B, T, V] tensor. ``token_stats`` is the one per-token kernel;
everything else is masking and aggregation around it.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

DEFAULT_CHUNK = 128

# KL-direction ablation (docs/PAPER.md §3): (student-owned loss, teacher-owned loss).
KL_VARIANTS = {
    "default": ("reverse", "forward"),
    "swapped": ("forward", "reverse"),
    "both_reverse": ("reverse", "reverse"),
}


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static loss options (hashable, so it can be a jit static argument).

    estimator: "sampled" uses only the log-probs of the sampled tokens (paper default);
        "exact" sums over the full vocabulary and needs the teacher's hidden states and head. The exact
        estimator is the true KL in either direction on either owner's tokens (it does not depend on which
        token was sampled); use it for the KL-direction ablation.
    student_kl / teacher_kl: "reverse" = KL(student || teacher), "forward" = KL(teacher || student),
        applied to student-owned / teacher-owned tokens. ``LossConfig.variant(name)`` builds the ablations.
    Sampled estimators, per token y_t with A_t = stop_grad(log p_T(y_t) - log p_S_old(y_t)). The paper's two
    are unbiased KL gradients; the two that only the ablation uses are our own approximations:
        reverse on student tokens (paper): PPO clipped surrogate on the ratio p_S / p_S_old with advantage
            A_t; y_t ~ student, so at ratio 1 its expected gradient is the gradient of KL(p_S || p_T).
        forward on teacher tokens (paper): cross-entropy -log p_S(y_t); y_t ~ teacher, so its expected
            gradient is the gradient of KL(p_T || p_S).
        reverse on teacher tokens (approximation): the same PPO surrogate on teacher-sampled tokens, with
            NO p_S / p_T importance weight. Its gradient is not the gradient of KL(p_S || p_T) (it would be
            with that weight); it pushes p_S up where p_T > p_S_old along the teacher's tokens.
        forward on student tokens (approximation): importance-weighted cross-entropy
            -min(exp(A_t), max_is_weight) * log p_S(y_t): exp(A_t) = p_T / p_S_old reweights student samples
            to the teacher, capped at max_is_weight (default 5) to bound the variance, so it is biased (it
            under-weights) wherever p_T / p_S_old exceeds the cap.
    aggregation: "token_mean" (per owner: masked sum / masked count) or "sequence_mean" (per owner: mean
        over each row's tokens, then mean over the rows that have any).
        "weighted_sum": sum of per-token loss x mask, where the caller has already divided the masks by
        the global normaliser; this keeps the token (or sequence) mean exact when a step's batch is split
        into micro-batches and devices with unequal token counts (the runner does this).
    Total loss: (1 - beta) * student_weight * L_student + beta * teacher_weight * L_teacher.
    chunk: time steps per logits chunk; peak memory ~ a few x B * chunk * V * 4 bytes.
    """
    estimator: str = "sampled"
    student_kl: str = "reverse"
    teacher_kl: str = "forward"
    clip_eps: float = 0.2
    max_is_weight: float = 5.0
    aggregation: str = "token_mean"
    student_weight: float = 1.0
    teacher_weight: float = 1.0
    chunk: int = DEFAULT_CHUNK

    def __post_init__(self):
        _check_choice("estimator", self.estimator, ("sampled", "exact"))
        _check_choice("student_kl", self.student_kl, ("reverse", "forward"))
        _check_choice("teacher_kl", self.teacher_kl, ("reverse", "forward"))
        _check_choice("aggregation", self.aggregation, ("token_mean", "sequence_mean", "weighted_sum"))
        if not (0.0 < self.clip_eps < 1.0 and self.max_is_weight > 0.0 and self.chunk >= 1):
            raise ValueError(f"need 0 < clip_eps < 1, max_is_weight > 0, chunk >= 1; got {self}")

    @classmethod
    def variant(cls, name: str, **kwargs) -> "LossConfig":
        """A KL-direction ablation by name: "default", "swapped" or "both_reverse"."""
        _check_choice("variant", name, tuple(KL_VARIANTS))
        student_kl, teacher_kl = KL_VARIANTS[name]
        return cls(student_kl=student_kl, teacher_kl=teacher_kl, **kwargs)


class Ratio(NamedTuple):
    """A per-token metric kept as (numerator, denominator): micro-batches, devices and PPO updates add both
    and divide once (``resolve_ratios``), so an empty or small micro-batch cannot dilute the logged value."""
    num: jax.Array
    den: jax.Array


def resolve_ratios(metrics: Mapping) -> dict:
    """Every Ratio metric divided out (NaN where its denominator is 0: nothing to measure)."""
    def value(v):
        if not isinstance(v, Ratio):
            return v
        num, den = jnp.asarray(v.num, jnp.float32), jnp.asarray(v.den, jnp.float32)
        return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.nan)
    return {k: value(v) for k, v in metrics.items()}


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_shape(name, x, shape):
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")


def _check_head(name, hidden, head):
    if hidden.ndim != 3 or head.ndim != 2 or head.shape[0] != hidden.shape[-1]:
        raise ValueError(f"{name}: expected hidden [B, T, D] and head [D, V], got hidden {tuple(hidden.shape)} "
                         f"and head {tuple(head.shape)}")


# ---------------------------------------------------------------------------------------------------------
# Per-token kernel


def token_stats(logits, targets, teacher_logits=None):
    """Per-token statistics from logits [..., V] (computed in float32).

    Returns {"logp": log p_S(target), "entropy": H(p_S) (no gradient)} and, with teacher logits (no
    gradient), {"reverse_kl": KL(p_S || p_T), "forward_kl": KL(p_T || p_S)}, each of shape [...].
    """
    logq = jax.nn.log_softmax(logits.astype(jnp.float32))
    q = jnp.exp(logq)
    out = {
        "logp": jnp.take_along_axis(logq, targets[..., None].astype(jnp.int32), axis=-1)[..., 0],
        "entropy": lax.stop_gradient(-jnp.sum(q * logq, axis=-1)),
    }
    if teacher_logits is not None:
        logt = lax.stop_gradient(jax.nn.log_softmax(teacher_logits.astype(jnp.float32)))
        out["reverse_kl"] = jnp.sum(q * (logq - logt), axis=-1)
        out["forward_kl"] = jnp.sum(jnp.exp(logt) * (logt - logq), axis=-1)
    return out


def _logits(hidden, head):
    return jnp.einsum("btd,dv->btv", hidden, head, preferred_element_type=jnp.float32)


def chunked_token_stats(hidden, head, targets, teacher_hidden=None, teacher_head=None, chunk=DEFAULT_CHUNK):
    """``token_stats`` of ``hidden @ head`` (and ``teacher_hidden @ teacher_head``), T-chunk by T-chunk.

    hidden [B, T, D], head [D, V], targets [B, T]; teacher_hidden [B, T, D'], teacher_head [D', V].
    T need not be a multiple of ``chunk`` (padded internally). Returns a dict of [B, T] arrays.
    """
    _check_head("student", hidden, head)
    B, T = hidden.shape[:2]
    _check_shape("targets", targets, (B, T))
    with_teacher = teacher_hidden is not None or teacher_head is not None
    if with_teacher:
        if teacher_hidden is None or teacher_head is None:
            raise ValueError("teacher_hidden and teacher_head must be given together")
        _check_head("teacher", teacher_hidden, teacher_head)
        _check_shape("teacher_hidden", teacher_hidden, (B, T, teacher_hidden.shape[-1]))
        if teacher_head.shape[1] != head.shape[1]:
            raise ValueError(f"student head vocab {head.shape[1]} != teacher head vocab {teacher_head.shape[1]}: "
                             "teacher and student must share a tokenizer")
        teacher_hidden, teacher_head = lax.stop_gradient(teacher_hidden), lax.stop_gradient(teacher_head)

    c = min(chunk, T)
    n = -(-T // c)

    def split(x):  # [B, T, ...] -> [n, B, c, ...], zero-padded in time
        x = jnp.pad(x, [(0, 0), (0, n * c - T)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(B, n, c, *x.shape[2:]), 1, 0)

    # Checkpointed body: the backward pass recomputes each chunk's logits instead of storing them.
    @jax.checkpoint
    def body(xs):
        if with_teacher:
            h, y, th = xs
            return token_stats(_logits(h, head), y, _logits(th, teacher_head))
        h, y = xs
        return token_stats(_logits(h, head), y)

    xs = (hidden, targets, teacher_hidden) if with_teacher else (hidden, targets)
    out = lax.map(body, tuple(split(x) for x in xs))
    return {k: jnp.moveaxis(v, 0, 1).reshape(B, n * c)[:, :T] for k, v in out.items()}


def token_logprobs(hidden, head, targets, chunk=DEFAULT_CHUNK):
    """(log p(targets) [B, T], entropy [B, T]) of ``hidden @ head``, chunked over T."""
    stats = chunked_token_stats(hidden, head, targets, chunk=chunk)
    return stats["logp"], stats["entropy"]


def ppo_surrogate(logp, old_logprobs, advantage, clip_eps=0.2):
    """Per-token PPO clipped surrogate -min(r A, clip(r, 1-eps, 1+eps) A), r = exp(logp - old).

    Returns (loss, clipped); ``clipped`` marks tokens where the loss strictly takes the clipped branch,
    so they contribute no gradient. ``advantage`` is treated as a constant.
    """
    advantage = lax.stop_gradient(advantage)
    ratio = jnp.exp(logp - old_logprobs)
    unclipped_loss = -ratio * advantage
    clipped_loss = -jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantage
    return jnp.maximum(unclipped_loss, clipped_loss), clipped_loss > unclipped_loss


# ---------------------------------------------------------------------------------------------------------
# Aggregation and the full losses


def _masked_mean(x, mask, aggregation):
    if aggregation == "weighted_sum":  # masks are host-normalised weights (see LossConfig)
        return jnp.sum(x * mask)
    if aggregation == "token_mean":
        return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    row_count = jnp.sum(mask, axis=1)
    row_mean = jnp.sum(x * mask, axis=1) / jnp.maximum(row_count, 1.0)
    has = (row_count > 0).astype(x.dtype)
    return jnp.sum(row_mean * has) / jnp.maximum(jnp.sum(has), 1.0)


def _sampled_owner_loss(direction, owner, logp, old_logprobs, teacher_logprobs, cfg):
    """Per-token sampled loss for one owner's tokens; also returns the PPO clip indicator."""
    advantage = lax.stop_gradient(teacher_logprobs - old_logprobs)
    if direction == "reverse":
        return ppo_surrogate(logp, old_logprobs, advantage, cfg.clip_eps)
    no_clip = jnp.zeros(logp.shape, bool)
    if owner == "teacher":
        return -logp, no_clip
    return -jnp.minimum(jnp.exp(advantage), cfg.max_is_weight) * logp, no_clip


def distill_loss(student_hidden, student_head, batch: Mapping[str, jax.Array], beta, cfg: LossConfig = LossConfig(),
                 teacher_hidden=None, teacher_head=None):
    """Guided-OPD loss L = (1 - beta) * w_S * L_student + beta * w_T * L_teacher.

    student_hidden [B, T, D] (final-norm hidden states), student_head [D, V]; batch holds "targets",
    "student_mask", "teacher_mask" and, for the sampled estimator, "old_logprobs" and "teacher_logprobs".
    The exact estimator needs teacher_hidden [B, T, D'] and teacher_head [D', V] instead (no gradient).
    beta may be traced; cfg is static. Returns (loss, metrics): scalars, token counts (n_*) and per-token
    metrics as ``Ratio`` sums over student tokens (``resolve_ratios`` divides them out).
    """
    _check_head("student", student_hidden, student_head)
    B, T = student_hidden.shape[:2]
    needed = ("targets", "student_mask", "teacher_mask")
    needed += ("old_logprobs", "teacher_logprobs") if cfg.estimator == "sampled" else ()
    for name in needed:
        if name not in batch:
            raise ValueError(f"batch is missing {name!r} (needed by estimator={cfg.estimator!r})")
        _check_shape(name, batch[name], (B, T))
    if cfg.estimator == "exact" and (teacher_hidden is None or teacher_head is None):
        raise ValueError("estimator='exact' needs teacher_hidden and teacher_head")

    s_mask = batch["student_mask"].astype(jnp.float32)
    t_mask = batch["teacher_mask"].astype(jnp.float32)
    if cfg.estimator == "exact":
        stats = chunked_token_stats(student_hidden, student_head, batch["targets"], teacher_hidden, teacher_head,
                                    chunk=cfg.chunk)
        s_tok, t_tok = stats[cfg.student_kl + "_kl"], stats[cfg.teacher_kl + "_kl"]
        s_clip = jnp.zeros((B, T), bool)
    else:
        stats = chunked_token_stats(student_hidden, student_head, batch["targets"], chunk=cfg.chunk)
        # Zero every input where no loss is taken, so junk there (e.g. exp overflow of the ratio) cannot
        # turn into inf * 0 = NaN in the backward pass.
        live = (s_mask + t_mask) > 0
        logp, old, tlp = (jnp.where(live, x.astype(jnp.float32), 0.0)
                          for x in (stats["logp"], batch["old_logprobs"], batch["teacher_logprobs"]))
        s_tok, s_clip = _sampled_owner_loss(cfg.student_kl, "student", logp, old, tlp, cfg)
        t_tok, _ = _sampled_owner_loss(cfg.teacher_kl, "teacher", logp, old, tlp, cfg)

    loss_student = _masked_mean(s_tok, s_mask, cfg.aggregation)
    loss_teacher = _masked_mean(t_tok, t_mask, cfg.aggregation)
    beta = jnp.asarray(beta, jnp.float32)
    loss = (1.0 - beta) * cfg.student_weight * loss_student + beta * cfg.teacher_weight * loss_teacher

    # Metrics count tokens (0/1), whatever weights the masks carry; per-token ones stay Ratio sums.
    s_tok_ind = (s_mask > 0).astype(jnp.float32)
    n_student = jnp.sum(s_tok_ind)
    metrics = {
        "loss": loss,
        "loss_student": loss_student,
        "loss_teacher": loss_teacher,
        "n_student_tokens": n_student,
        "n_teacher_tokens": jnp.sum((t_mask > 0).astype(jnp.float32)),
        "clip_frac": Ratio(jnp.sum(s_clip * s_tok_ind), n_student),
        "student_entropy": Ratio(jnp.sum(stats["entropy"] * s_tok_ind), n_student),
    }
    if "old_logprobs" in batch and "teacher_logprobs" in batch:
        sampled_kl = jnp.where(s_tok_ind > 0, batch["old_logprobs"] - batch["teacher_logprobs"], 0.0)
        metrics["sampled_kl"] = Ratio(jnp.sum(sampled_kl), n_student)
    if "old_logprobs" in batch:
        # The PPO ratio p_S / p_S_old on student tokens: 1 on the first update of a rollout batch.
        ratio = jnp.where(s_tok_ind > 0, jnp.exp(stats["logp"] - jnp.where(s_tok_ind > 0, batch["old_logprobs"], 0.0)),
                          0.0)
        metrics["ppo_ratio"] = Ratio(lax.stop_gradient(jnp.sum(ratio)), n_student)
    return loss, metrics


def masked_nll(logp, mask):
    """Weighted token-mean NLL: sum(mask * -logp) / sum(mask). A 0/1 mask selects tokens; fractional weights
    down-weight some; a NaN weight keeps the result NaN (so the update step skips it)."""
    mask = mask.astype(jnp.float32)
    total = jnp.sum(mask)
    return -jnp.sum(jnp.where(mask > 0, mask * logp, 0.0)) / jnp.where(total == 0, 1.0, total)


def sft_loss(hidden, head, targets, mask, chunk=DEFAULT_CHUNK):
    """`masked_nll` of ``hidden @ head`` at `targets` (the SFT baseline: mask = assistant tokens)."""
    _check_shape("mask", mask, hidden.shape[:2])
    logp, _ = token_logprobs(hidden, head, targets, chunk=chunk)
    return masked_nll(logp, mask)


def is_finite(loss, grads) -> jax.Array:
    """True iff the loss and every gradient leaf are finite (the train step skips the update otherwise)."""
    leaves = [jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(loss))] + leaves))
