"""gopd_jax.losses against independent float64 numpy references (jax runs in float32; tolerances ~1e-5)."""
import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import ablation_kl
from gopd_jax import losses as L
from gopd_jax.experiment import ExperimentConfig, save_config

B, T, D, DT, V = 3, 9, 6, 4, 13
RTOL, ATOL = 2e-5, 2e-6


# --------------------------------------------------------------------------------------------------------
# float64 numpy reference


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_token_stats(h, w, y, th, tw):
    logq, logt = np_log_softmax(h @ w), np_log_softmax(th @ tw)
    q, p = np.exp(logq), np.exp(logt)
    return {
        "logp": np.take_along_axis(logq, y[..., None], -1)[..., 0],
        "entropy": -(q * logq).sum(-1),
        "reverse_kl": (q * (logq - logt)).sum(-1),
        "forward_kl": (p * (logt - logq)).sum(-1),
        "q": q, "p": p, "logq": logq, "logt": logt,
    }


def np_owner_mean(x, mask, aggregation):
    if aggregation == "token_mean":
        return (x * mask).sum() / max(mask.sum(), 1.0)
    rows = [(x[b] * mask[b]).sum() / mask[b].sum() for b in range(x.shape[0]) if mask[b].sum() > 0]
    return float(np.mean(rows)) if rows else 0.0


def np_per_token(direction, owner, estimator, st, old, tlp, eps=0.2, cap=5.0):
    if estimator == "exact":
        return st[direction + "_kl"]
    adv = tlp - old
    if direction == "reverse":
        r = np.exp(st["logp"] - old)
        return -np.minimum(r * adv, np.clip(r, 1 - eps, 1 + eps) * adv)
    if owner == "teacher":
        return -st["logp"]
    return -np.minimum(np.exp(adv), cap) * st["logp"]


def np_distill(data, beta, estimator, student_kl, teacher_kl, aggregation, ws=1.0, wt=1.0):
    st = np_token_stats(data["h"], data["w"], data["targets"], data["th"], data["tw"])
    old, tlp = data["old_logprobs"], data["teacher_logprobs"]
    sm, tm = data["student_mask"], data["teacher_mask"]
    ls = np_owner_mean(np_per_token(student_kl, "student", estimator, st, old, tlp), sm, aggregation)
    lt = np_owner_mean(np_per_token(teacher_kl, "teacher", estimator, st, old, tlp), tm, aggregation)
    return (1 - beta) * ws * ls + beta * wt * lt, ls, lt, st


# --------------------------------------------------------------------------------------------------------
# data


def make_data(seed=0):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(B, T, D))
    w = rng.normal(size=(D, V)) * 0.8
    th = rng.normal(size=(B, T, DT))
    tw = rng.normal(size=(DT, V)) * 0.8
    targets = rng.integers(0, V, size=(B, T))
    u = rng.random((B, T))
    sm = (u < 0.45).astype(np.float64)
    tm = ((u >= 0.45) & (u < 0.75)).astype(np.float64)
    tm[2] = 0.0  # a row with no teacher tokens (sequence_mean must skip it)
    st = np_token_stats(h, w, targets, th, tw)
    any_mask = (sm + tm) > 0
    # old log-probs near the current ones so ratios straddle the clip range; 0 where masked (contract)
    old = np.where(any_mask, st["logp"] + rng.normal(0, 0.3, size=(B, T)), 0.0)
    tlp = np.where(any_mask, st["logp"] + rng.normal(0, 1.0, size=(B, T)), 0.0)
    return dict(h=h, w=w, th=th, tw=tw, targets=targets, student_mask=sm, teacher_mask=tm,
                old_logprobs=old, teacher_logprobs=tlp)


def jax_args(data):
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    batch = {k: f32(data[k]) for k in ("student_mask", "teacher_mask", "old_logprobs", "teacher_logprobs")}
    batch["targets"] = jnp.asarray(data["targets"], jnp.int32)
    return f32(data["h"]), f32(data["w"]), batch, f32(data["th"]), f32(data["tw"])


def close(a, b, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------------------
# per-token values


def test_token_logprobs_and_kls_match_numpy():
    data = make_data()
    h, w, batch, th, tw = jax_args(data)
    ref = np_token_stats(data["h"], data["w"], data["targets"], data["th"], data["tw"])
    logp, ent = L.token_logprobs(h, w, batch["targets"], chunk=4)
    close(logp, ref["logp"])
    close(ent, ref["entropy"])
    stats = L.chunked_token_stats(h, w, batch["targets"], th, tw, chunk=4)
    for k in ("logp", "entropy", "reverse_kl", "forward_kl"):
        close(stats[k], ref[k])


def test_bfloat16_inputs_use_float32_logits():
    data = make_data(11)
    h, w, batch, _, _ = jax_args(data)
    logp, ent = L.token_logprobs(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16), batch["targets"], chunk=4)
    assert logp.dtype == jnp.float32 and ent.dtype == jnp.float32
    ref = np_token_stats(data["h"], data["w"], data["targets"], data["th"], data["tw"])
    close(logp, ref["logp"], rtol=0.05, atol=0.05)


def test_sft_loss_matches_numpy():
    data = make_data(1)
    h, w, batch, _, _ = jax_args(data)
    mask = data["student_mask"] + data["teacher_mask"]
    ref = np_token_stats(data["h"], data["w"], data["targets"], data["th"], data["tw"])
    expected = -(ref["logp"] * mask).sum() / mask.sum()
    close(L.sft_loss(h, w, batch["targets"], jnp.asarray(mask, jnp.float32), chunk=5), expected)
    # Fractional weights (prompt tokens down-weighted): a weighted mean.
    weights = data["student_mask"] + 0.1 * data["teacher_mask"]
    expected = -(ref["logp"] * weights).sum() / weights.sum()
    close(L.sft_loss(h, w, batch["targets"], jnp.asarray(weights, jnp.float32), chunk=5), expected)


# --------------------------------------------------------------------------------------------------------
# full loss, every estimator / KL variant / aggregation


@pytest.mark.parametrize("estimator,variant,aggregation", list(itertools.product(
    ["sampled", "exact"], ["default", "swapped", "both_reverse"], ["token_mean", "sequence_mean"])))
def test_distill_loss_matches_numpy(estimator, variant, aggregation):
    data = make_data(2)
    h, w, batch, th, tw = jax_args(data)
    cfg = L.LossConfig.variant(variant, estimator=estimator, aggregation=aggregation,
                               student_weight=1.3, teacher_weight=0.7, chunk=4)
    beta = 0.35
    fn = jax.jit(L.distill_loss, static_argnames="cfg")
    loss, m = fn(h, w, batch, beta, cfg=cfg, teacher_hidden=th, teacher_head=tw)
    m = L.resolve_ratios(m)
    skl, tkl = L.KL_VARIANTS[variant]
    ref, ls, lt, st = np_distill(data, beta, estimator, skl, tkl, aggregation, 1.3, 0.7)
    close(loss, ref)
    close(m["loss_student"], ls)
    close(m["loss_teacher"], lt)
    sm = data["student_mask"]
    assert float(m["n_student_tokens"]) == sm.sum()
    assert float(m["n_teacher_tokens"]) == data["teacher_mask"].sum()
    close(m["student_entropy"], (st["entropy"] * sm).sum() / sm.sum())
    close(m["sampled_kl"], ((data["old_logprobs"] - data["teacher_logprobs"]) * sm).sum() / sm.sum())
    if estimator == "sampled" and skl == "reverse":
        r = np.exp(st["logp"] - data["old_logprobs"])
        adv = data["teacher_logprobs"] - data["old_logprobs"]
        clipped = np.where(adv > 0, r > 1.2, r < 0.8)
        expected_frac = (clipped * sm).sum() / sm.sum()
        assert 0 < expected_frac < 1  # the data exercises both branches
        close(m["clip_frac"], expected_frac)
    else:
        assert float(m["clip_frac"]) == 0.0


def np_owner_weights(mask, aggregation):
    """Per-token weights w with sum(w * x) = the owner's aggregated mean of x."""
    if aggregation == "token_mean":
        return mask / max(mask.sum(), 1.0)
    rows = mask.sum(1, keepdims=True)
    return mask / np.maximum(rows, 1.0) / max((rows > 0).sum(), 1)


def np_kl_logit_grad(direction, st):
    """d/dz KL(q||p) = q (log q - log p - KL(q||p)); d/dz KL(p||q) = q - p (q = softmax z, p fixed)."""
    if direction == "reverse":
        return st["q"] * (st["logq"] - st["logt"] - st["reverse_kl"][..., None])
    return st["q"] - st["p"]


@pytest.mark.parametrize("student_kl,teacher_kl,aggregation", list(itertools.product(
    ["reverse", "forward"], ["reverse", "forward"], ["token_mean", "sequence_mean"])))
def test_exact_estimator_every_direction_on_every_owner(student_kl, teacher_kl, aggregation):
    """Full-vocabulary KL per owner, values and gradients (through hidden @ head) against float64 analytic ones:
    including reverse KL on teacher-owned tokens and forward KL on student-owned tokens."""
    data = make_data(3)
    h, w, batch, th, tw = jax_args(data)
    beta, ws, wt = 0.4, 1.3, 0.7
    cfg = L.LossConfig(estimator="exact", student_kl=student_kl, teacher_kl=teacher_kl, aggregation=aggregation,
                       student_weight=ws, teacher_weight=wt, chunk=2)
    f = lambda h_, w_: L.distill_loss(h_, w_, batch, beta, cfg, th, tw)
    (loss, m), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(h, w)
    st = np_token_stats(data["h"], data["w"], data["targets"], data["th"], data["tw"])
    ps, pt = (np_owner_weights(data[k], aggregation) for k in ("student_mask", "teacher_mask"))
    ls, lt = (st[student_kl + "_kl"] * ps).sum(), (st[teacher_kl + "_kl"] * pt).sum()
    close(m["loss_student"], ls)
    close(m["loss_teacher"], lt)
    close(loss, (1 - beta) * ws * ls + beta * wt * lt)
    dz = ((1 - beta) * ws * ps)[..., None] * np_kl_logit_grad(student_kl, st) \
        + (beta * wt * pt)[..., None] * np_kl_logit_grad(teacher_kl, st)
    close(grads[0], dz @ data["w"].T, atol=1e-5)
    close(grads[1], np.einsum("btd,btv->dv", data["h"], dz), atol=1e-5)
    # Exact means no dependence on which token was sampled.
    other = dict(batch, targets=jnp.asarray(np.random.default_rng(30).integers(0, V, (B, T)), jnp.int32))
    loss2, grads2 = jax.value_and_grad(lambda h_, w_: L.distill_loss(h_, w_, other, beta, cfg, th, tw)[0],
                                       argnums=(0, 1))(h, w)
    close(loss2, loss, rtol=1e-6, atol=0)
    close(grads2[1], grads[1], rtol=1e-6, atol=1e-7)


def _sampled_expected_head_grad(owner, direction, token_weight, max_is_weight=5.0, seed=13):
    """The head gradient of a sampled-estimator owner loss in expectation over the sampled token, computed
    exactly: one context, every vocabulary token as a row, rows weighted by `token_weight(q, p)` (the sampling
    probability, times any correction) through weighted_sum masks. pS_old = pS (first update: ratio 1).
    Returns (that gradient, the float64 analytic head gradient of the exact KL in `direction`)."""
    rng = np.random.default_rng(seed)
    h0, th0 = rng.normal(size=D), rng.normal(size=DT)
    w, tw = rng.normal(size=(D, V)) * 0.8, rng.normal(size=(DT, V)) * 0.8
    st = np_token_stats(h0[None, None], w, np.zeros((1, 1), int), th0[None, None], tw)
    q, p = st["q"][0, 0], st["p"][0, 0]
    weight = token_weight(q, p)[:, None]
    zeros = np.zeros((V, 1))
    batch = {"targets": jnp.arange(V, dtype=jnp.int32)[:, None],
             "student_mask": jnp.asarray(weight if owner == "student" else zeros, jnp.float32),
             "teacher_mask": jnp.asarray(weight if owner == "teacher" else zeros, jnp.float32),
             "old_logprobs": jnp.asarray(np.log(q)[:, None], jnp.float32),
             "teacher_logprobs": jnp.asarray(np.log(p)[:, None], jnp.float32)}
    kl = {"student_kl": direction} if owner == "student" else {"teacher_kl": direction}
    cfg = L.LossConfig(aggregation="weighted_sum", max_is_weight=max_is_weight, **kl)
    hidden = jnp.asarray(np.broadcast_to(h0, (V, 1, D)), jnp.float32)
    beta = 0.0 if owner == "student" else 1.0
    g = jax.grad(lambda w_: L.distill_loss(hidden, w_, batch, beta, cfg)[0])(jnp.asarray(w, jnp.float32))
    exact = np.outer(h0, np_kl_logit_grad(direction, {k: v[0, 0] for k, v in st.items()}))
    return np.asarray(g, np.float64), exact


def test_sampled_default_estimators_are_unbiased():
    """Student tokens y ~ pS, PPO surrogate: E grad = grad KL(pS||pT). Teacher tokens y ~ pT, cross-entropy:
    E grad = grad KL(pT||pS)."""
    g, exact = _sampled_expected_head_grad("student", "reverse", lambda q, p: q)
    close(g, exact, atol=1e-5)
    g, exact = _sampled_expected_head_grad("teacher", "forward", lambda q, p: p)
    close(g, exact, atol=1e-5)


def test_sampled_ablation_estimators_are_the_documented_approximations():
    """What LossConfig's docstring states: "reverse on teacher tokens" is the PPO surrogate on y ~ pT without
    the pS/pT importance weight (with it, it would be the reverse-KL gradient); "forward on student tokens"
    is importance-weighted cross-entropy, exact in expectation only while pT/pS stays under max_is_weight."""
    g, exact = _sampled_expected_head_grad("teacher", "reverse", lambda q, p: p)
    assert np.abs(g - exact).max() > 0.1 * np.abs(exact).max()  # biased as used
    g, exact = _sampled_expected_head_grad("teacher", "reverse", lambda q, p: p * q / p)
    close(g, exact, atol=1e-5)  # the missing weight, restored

    g, exact = _sampled_expected_head_grad("student", "forward", lambda q, p: q, max_is_weight=1e6)
    close(g, exact, atol=1e-5)  # cap never binds: unbiased
    g, exact = _sampled_expected_head_grad("student", "forward", lambda q, p: q, max_is_weight=1.0)
    assert np.abs(g - exact).max() > 0.1 * np.abs(exact).max()  # cap binds where pT > pS: biased


def test_reverse_kl_logit_gradient_is_analytic():
    rng = np.random.default_rng(4)
    z, zt = rng.normal(size=(5, V)) * 2, rng.normal(size=(5, V)) * 2
    y = jnp.zeros((5,), jnp.int32)
    g = jax.grad(lambda z_: jnp.sum(L.token_stats(z_, y, jnp.asarray(zt, jnp.float32))["reverse_kl"]))(
        jnp.asarray(z, jnp.float32))
    logq, logt = np_log_softmax(z), np_log_softmax(zt)
    q = np.exp(logq)
    kl = (q * (logq - logt)).sum(-1, keepdims=True)
    close(g, q * ((logq - logt) - kl), atol=1e-6)
    # the teacher side gets no gradient
    gt = jax.grad(lambda zt_: jnp.sum(L.token_stats(jnp.asarray(z, jnp.float32), y, zt_)["reverse_kl"]))(
        jnp.asarray(zt, jnp.float32))
    assert float(jnp.abs(gt).max()) == 0.0


# --------------------------------------------------------------------------------------------------------
# PPO surrogate


def test_ppo_gradient_at_ratio_one_is_policy_gradient():
    rng = np.random.default_rng(5)
    z = jnp.asarray(rng.normal(size=(6, V)), jnp.float32)
    y = jnp.asarray(rng.integers(0, V, 6), jnp.int32)
    adv = jnp.asarray(rng.normal(size=6), jnp.float32)

    def surrogate(z_):
        logp = L.token_stats(z_, y)["logp"]
        return jnp.sum(L.ppo_surrogate(logp, jax.lax.stop_gradient(logp), adv)[0])

    def logp_sum_weighted(z_):
        return jnp.sum(-adv * L.token_stats(z_, y)["logp"])

    close(jax.grad(surrogate)(z), jax.grad(logp_sum_weighted)(z), atol=1e-6)


def test_ppo_clip_indicator():
    ratio = np.array([0.5, 0.9, 1.1, 1.5] * 2)
    adv = np.array([1.0] * 4 + [-1.0] * 4)
    old = np.zeros(8, np.float32)
    logp = jnp.asarray(np.log(ratio), jnp.float32)
    loss, clipped = L.ppo_surrogate(logp, old, jnp.asarray(adv, jnp.float32), 0.2)
    # A > 0 clips above 1 + eps, A < 0 clips below 1 - eps
    np.testing.assert_array_equal(clipped, [False, False, False, True, True, False, False, False])
    close(loss, -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv))
    g = jax.grad(lambda lp: jnp.sum(L.ppo_surrogate(lp, old, jnp.asarray(adv, jnp.float32))[0]))(logp)
    assert np.all(np.asarray(g)[np.asarray(clipped)] == 0.0)
    assert np.all(np.asarray(g)[~np.asarray(clipped)] != 0.0)


# --------------------------------------------------------------------------------------------------------
# invariances


@pytest.mark.parametrize("estimator,aggregation", [("sampled", "token_mean"), ("exact", "sequence_mean")])
def test_unmasked_positions_do_not_matter(estimator, aggregation):
    data = make_data(6)
    cfg = L.LossConfig.variant("default", estimator=estimator, aggregation=aggregation, chunk=4)
    free = (data["student_mask"] + data["teacher_mask"]) == 0
    assert free.any()
    rng = np.random.default_rng(60)
    other = dict(data)
    other["h"] = np.where(free[..., None], rng.normal(size=data["h"].shape) * 50, data["h"])
    other["th"] = np.where(free[..., None], rng.normal(size=data["th"].shape) * 50, data["th"])
    other["targets"] = np.where(free, rng.integers(0, V, size=free.shape), data["targets"])
    other["old_logprobs"] = np.where(free, -100.0, data["old_logprobs"])
    other["teacher_logprobs"] = np.where(free, 30.0, data["teacher_logprobs"])

    def run(d):
        h, w, batch, th, tw = jax_args(d)
        f = lambda h_, w_: L.distill_loss(h_, w_, batch, 0.3, cfg, th, tw)[0]
        return jax.value_and_grad(f, argnums=(0, 1))(h, w)

    (l0, (gh0, gw0)), (l1, (gh1, gw1)) = run(data), run(other)
    close(l0, l1, rtol=1e-6, atol=0)
    close(gw0, gw1, rtol=1e-6, atol=1e-7)
    close(gh0, gh1, rtol=1e-6, atol=0)
    assert float(jnp.abs(gh1[jnp.asarray(free)]).max()) == 0.0


@pytest.mark.parametrize("estimator", ["sampled", "exact"])
def test_chunk_size_does_not_change_results(estimator):
    data = make_data(7)
    h, w, batch, th, tw = jax_args(data)
    results = []
    for chunk in (1, 2, 4, 9, 64):  # 2 and 4 do not divide T = 9
        cfg = L.LossConfig(estimator=estimator, chunk=chunk)
        f = lambda h_, w_: L.distill_loss(h_, w_, batch, 0.5, cfg, th, tw)[0]
        results.append(jax.value_and_grad(f, argnums=(0, 1))(h, w))
    for loss, (gh, gw) in results[1:]:
        close(loss, results[0][0], rtol=1e-6)
        close(gh, results[0][1][0], rtol=1e-5, atol=1e-7)
        close(gw, results[0][1][1], rtol=1e-5, atol=1e-7)


def test_beta_extremes_select_one_owner():
    data = make_data(8)
    h, w, batch, th, tw = jax_args(data)
    loss0, m0 = L.distill_loss(h, w, batch, 0.0)
    loss1, m1 = L.distill_loss(h, w, batch, 1.0)
    close(loss0, m0["loss_student"])
    close(loss1, m1["loss_teacher"])


# --------------------------------------------------------------------------------------------------------
# bad input


def test_shape_errors_name_the_array():
    data = make_data(9)
    h, w, batch, th, tw = jax_args(data)
    for name in ("targets", "student_mask", "teacher_mask", "old_logprobs", "teacher_logprobs"):
        bad = dict(batch, **{name: batch[name][:, :-1]})
        with pytest.raises(ValueError, match=f"{name} has shape \\(3, 8\\), expected \\(3, 9\\)"):
            L.distill_loss(h, w, bad, 0.5)
    with pytest.raises(ValueError, match="missing 'teacher_mask'"):
        L.distill_loss(h, w, {k: v for k, v in batch.items() if k != "teacher_mask"}, 0.5)
    with pytest.raises(ValueError, match="head"):
        L.token_logprobs(h, w[:-1], batch["targets"])
    with pytest.raises(ValueError, match="hidden \\[B, T, D\\]"):
        L.distill_loss(h[0], w, batch, 0.5)
    with pytest.raises(ValueError, match="mask has shape"):
        L.sft_loss(h, w, batch["targets"], batch["student_mask"][None])
    with pytest.raises(ValueError, match="needs teacher_hidden"):
        L.distill_loss(h, w, batch, 0.5, L.LossConfig(estimator="exact"))
    with pytest.raises(ValueError, match="teacher_hidden has shape"):
        L.distill_loss(h, w, batch, 0.5, L.LossConfig(estimator="exact"), th[:, :-1], tw)


def test_vocab_mismatch_error():
    data = make_data(10)
    h, w, batch, th, tw = jax_args(data)
    tw_big = jnp.concatenate([tw, tw[:, :2]], axis=1)
    with pytest.raises(ValueError, match=r"student head vocab 13 != teacher head vocab 15.*share a tokenizer"):
        L.distill_loss(h, w, batch, 0.5, L.LossConfig(estimator="exact"), th, tw_big)


def test_config_validation():
    with pytest.raises(ValueError, match="estimator"):
        L.LossConfig(estimator="mc")
    with pytest.raises(ValueError, match="aggregation"):
        L.LossConfig(aggregation="sum")
    with pytest.raises(ValueError, match="variant"):
        L.LossConfig.variant("both_forward")
    assert L.LossConfig.variant("swapped") == L.LossConfig(student_kl="forward", teacher_kl="reverse")
    hash(L.LossConfig())


def test_is_finite():
    grads = {"a": jnp.ones(3), "b": [jnp.zeros((2, 2))]}
    assert bool(L.is_finite(jnp.float32(1.0), grads))
    assert not bool(L.is_finite(jnp.float32(jnp.inf), grads))
    assert not bool(L.is_finite(jnp.float32(1.0), {"a": jnp.array([1.0, jnp.nan])}))
    assert bool(jax.jit(L.is_finite)(jnp.float32(0.0), grads))


def test_weighted_sum_with_host_normalised_masks_is_the_global_token_mean():
    """Split a batch into unequal micro-batches: averaging their weighted sums (masks pre-divided by the
    global count, times the number of micro-batches) gives the token mean of the whole batch."""
    rng = np.random.default_rng(11)
    B, T, D, V = 4, 6, 8, 13
    hidden = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    s_mask = (rng.random((B, T)) < 0.6).astype(np.float32)
    s_mask[2:] *= (rng.random((2, T)) < 0.3)  # second half holds far fewer tokens
    t_mask = np.zeros((B, T), np.float32)
    batch = {"targets": targets, "student_mask": s_mask, "teacher_mask": t_mask,
             "old_logprobs": jnp.asarray(rng.normal(size=(B, T)) - 2, jnp.float32),
             "teacher_logprobs": jnp.asarray(rng.normal(size=(B, T)) - 2, jnp.float32)}
    whole, _ = L.distill_loss(hidden, head, batch, 0.0, L.LossConfig())
    weighted = dict(batch, student_mask=s_mask * 2 / s_mask.sum())
    halves = [L.distill_loss(hidden[i:i + 2], head, {k: v[i:i + 2] for k, v in weighted.items()}, 0.0,
                           L.LossConfig(aggregation="weighted_sum"))[0] for i in (0, 2)]
    np.testing.assert_allclose((halves[0] + halves[1]) / 2, whole, rtol=1e-5)


def test_metrics_are_per_token_means_when_masks_carry_weights():
    rng = np.random.default_rng(12)
    B, T, D, V = 3, 5, 8, 11
    hidden = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    mask = (rng.random((B, T)) < 0.7).astype(np.float32)
    batch = {"targets": jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32), "student_mask": mask,
             "teacher_mask": np.zeros((B, T), np.float32),
             "old_logprobs": jnp.asarray(rng.normal(size=(B, T)) - 2, jnp.float32),
             "teacher_logprobs": jnp.asarray(rng.normal(size=(B, T)) - 2, jnp.float32)}
    _, plain = L.distill_loss(hidden, head, batch, 0.0, L.LossConfig())
    _, weighted = L.distill_loss(hidden, head, dict(batch, student_mask=mask * 0.01), 0.0,
                                 L.LossConfig(aggregation="weighted_sum"))
    plain, weighted = L.resolve_ratios(plain), L.resolve_ratios(weighted)
    for k in ("clip_frac", "student_entropy", "sampled_kl", "ppo_ratio"):
        np.testing.assert_allclose(weighted[k], plain[k], rtol=1e-5, err_msg=k)


# --------------------------------------------------------------------------------------------------------
# the KL-direction ablation module


def test_ablation_kl_defaults_to_exact_and_states_the_sampled_approximations(tmp_path, capsys):
    """--help and results.md say what the estimators compute; finished variants are read back, not rerun."""
    with pytest.raises(SystemExit):
        ablation_kl.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: 'exact')" in help_text
    assert "PPO surrogate on teacher-sampled tokens with no p_S/p_T importance weight" in help_text
    assert "capped at 5 (LossConfig.max_is_weight)" in help_text
    for d in ("student", "teacher"):  # what config validation checks for (the runs are already finished)
        (tmp_path / d).mkdir()
        for f in ("config.json", "tokenizer_config.json"):
            (tmp_path / d / f).write_text("{}")
    models = dict(student=str(tmp_path / "student"), teacher=str(tmp_path / "teacher"))
    argv = ["--student", models["student"], "--teacher", models["teacher"]]
    for estimator in ("exact", "sampled"):
        out = tmp_path / "runs" / estimator
        base = ExperimentConfig(name="ablation_kl", out_dir=str(out), estimator=estimator, **models)
        for i, (name, over) in enumerate(ablation_kl.VARIANTS.items()):  # finished with the requested config
            run = dataclasses.replace(base, name=f"ablation_kl/{name}", out_dir=str(out / name), **over)
            save_config(run, run.out_dir)
            (out / name / "final_eval.json").write_text(json.dumps(dict(score=10.0 + i, success_rate=5.0, rounds=7.0,
                                                                        n=4)))
        ablation_kl.main(argv + ["--out-dir", str(out), "--estimator", estimator])
        results = (out / "results.md").read_text()
        assert "| swapped | 11.00 |" in results and results.count("Estimator:") == 1
        assert ablation_kl.ESTIMATOR_NOTES[estimator] in results
    with pytest.raises(ValueError, match="estimator: 'exact' there, 'sampled' now"):  # never another experiment's
        ablation_kl.main(argv + ["--out-dir", str(tmp_path / "runs" / "exact"), "--estimator", "sampled"])
    with pytest.raises(ValueError, match="estimator must be one of"):
        ablation_kl.main(argv + ["--estimator", "mc"])
