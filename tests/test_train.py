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


def test_prompt_weight_trains_prompt_tokens_at_that_weight_against_float64_numpy():
    from gopd_jax.models import forward_hidden, output_head

    batch = make_batch(0)
    batch["prompt_mask"] = np.zeros_like(batch["loss_mask"])
    batch["prompt_mask"][:, :3] = 1.0
    params = init_params(CFG, jax.random.PRNGKey(0))
    logits = (np.asarray(forward_hidden(params, CFG, batch["tokens"]), np.float64)
              @ np.asarray(output_head(params, CFG), np.float64))
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    reply, prompt = batch["loss_mask"], batch["prompt_mask"]
    loss, metrics = LOSS(params, batch, prompt_weight=0.1)
    want = ((nll * reply).sum() + 0.1 * (nll * prompt).sum()) / (reply.sum() + 0.1 * prompt.sum())
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["reply_loss"], (nll * reply).sum() / reply.sum(), rtol=1e-5)
    np.testing.assert_allclose(LOSS(params, batch)[0], metrics["reply_loss"], rtol=1e-6)  # weight 0: replies only


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


# ---- distillation metrics and PPO mini-batch updates ---------------------------------------------------------

def distill_batch(seed, rows=8, t=16):
    """Rows of student / teacher tokens with unequal counts; rows 0-1 have no student tokens at all, so on
    4 devices x 2 micro-batches one micro-batch has none (and others differ)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CFG.vocab_size, (rows, t)).astype(np.int32)
    targets = np.concatenate([tokens[:, 1:], np.zeros((rows, 1), np.int32)], axis=1)
    student, teacher = np.zeros((rows, t), np.float32), np.zeros((rows, t), np.float32)
    for i in range(rows):
        start, end = 3, 3 + int(rng.integers(2, t - 4))
        (teacher if i < 2 else student)[i, start:end] = 1.0
    return {"tokens": tokens, "targets": targets, "student_mask": student, "teacher_mask": teacher,
            "old_logprobs": (rng.normal(size=(rows, t)) - 4).astype(np.float32) * student,
            "teacher_logprobs": (rng.normal(size=(rows, t)) - 4).astype(np.float32) * (student + teacher)}


def host_student_metrics(params, batch):
    """float64 host reference: per-token means over every student token of the batch."""
    from gopd_jax.models import forward

    logits = np.asarray(forward(params, CFG, jnp.asarray(batch["tokens"])), np.float64)
    logq = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    logp = np.take_along_axis(logq, batch["targets"][..., None], -1)[..., 0]
    m = batch["student_mask"] > 0
    ratio = np.exp(logp - batch["old_logprobs"])
    adv = batch["teacher_logprobs"] - batch["old_logprobs"]
    clipped = np.where(adv > 0, ratio > 1.2, ratio < 0.8)
    return {"student_entropy": float((-(np.exp(logq) * logq).sum(-1))[m].mean()),
            "sampled_kl": float((batch["old_logprobs"] - batch["teacher_logprobs"])[m].mean()),
            "ppo_ratio": float(ratio[m].mean()), "clip_frac": float(clipped[m].mean()), "n": int(m.sum()),
            "logp": logp}


def _distill_step(opt, devices=None, accum=1, eps=0.2):
    from gopd_jax import losses

    loss = functools.partial(train.distill_loss_fn, config=CFG,
                             loss_config=losses.LossConfig(aggregation="weighted_sum", clip_eps=eps, chunk=8))
    if devices is None:
        return train.jit_update_step(loss, opt, accum_steps=accum)
    return train.pmap_update_step(loss, opt, accum_steps=accum, devices=devices)


@pytest.mark.multidevice
@pytest.mark.timeout(300)
def test_logged_metrics_are_ratios_of_global_sums_with_empty_and_unequal_micro_batches():
    from gopd_jax.batch import normalise_masks

    opt, state = new_state()
    devices = jax.local_devices()[:N_DEV]
    batch = distill_batch(0)
    ref = host_student_metrics(state.params, batch)
    step = _distill_step(opt, devices, accum=2)
    weighted = normalise_masks(batch, N_DEV * 2, "token_mean")
    _, m = jax.block_until_ready(step(train.replicate(state, devices), train.shard_batch(weighted, N_DEV),
                                      beta=jnp.float32(0.5)))
    merged = train.merge_metrics([train.unreplicate(m)])
    assert merged["n_student_tokens"] == ref["n"]
    for k in ("student_entropy", "sampled_kl", "ppo_ratio", "clip_frac"):
        np.testing.assert_allclose(merged[k], ref[k], rtol=1e-4, err_msg=k)
    assert 0 < ref["clip_frac"] < 1
    # a batch split in two uneven updates logs the same as one update over it (sums add, divide once)
    first, second = ({k: v[rows] for k, v in batch.items()} for rows in (slice(0, 3), slice(3, 8)))
    single = _distill_step(opt)
    parts = [single(jax.tree.map(jnp.copy, state), normalise_masks(p, 1, "token_mean"), beta=jnp.float32(0.5))[1]
             for p in (first, second)]  # the same params for both parts: the step donates its state
    merged2 = train.merge_metrics(parts)
    for k in ("student_entropy", "sampled_kl", "ppo_ratio", "clip_frac", "n_student_tokens"):
        np.testing.assert_allclose(merged2[k], merged[k], rtol=1e-4, err_msg=k)


@pytest.mark.timeout(300)
def test_ppo_mini_batch_updates_move_the_ratio_and_count_clipped_tokens():
    from gopd_jax.batch import mini_batches, normalise_masks

    opt, state = new_state(lr=3e-2)
    batch = distill_batch(1)
    # p_S_old = the model's own log-probs, as from the sampling pass
    batch["old_logprobs"] = (host_student_metrics(state.params, batch)["logp"] * batch["student_mask"]).astype(
        np.float32)
    step = _distill_step(opt, eps=0.05)
    rng = np.random.default_rng(0)
    epochs = []
    for _ in range(2):
        metrics = []
        for part in mini_batches(batch, 8, 2, 1, rng):
            assert part["tokens"].shape[0] == 4
            state, m = step(state, normalise_masks(part, 1, "token_mean"), beta=jnp.float32(0.0))
            metrics.append(m)
        epochs.append(train.merge_metrics(metrics))
        if len(epochs) == 1:  # the very first update sees p_S == p_S_old: ratio 1, nothing clipped
            first = train.merge_metrics(metrics[:1])
            assert first["ppo_ratio"] == pytest.approx(1.0, abs=1e-5) and first["clip_frac"] == 0.0
    # after updates the ratio leaves 1 and the clip acts
    assert abs(epochs[1]["ppo_ratio"] - 1.0) > 1e-3
    assert epochs[1]["clip_frac"] > 0.0
    assert epochs[0]["n_student_tokens"] == epochs[1]["n_student_tokens"] == (batch["student_mask"] > 0).sum()

@pytest.mark.multidevice
@pytest.mark.timeout(300)
def test_fsdp_matches_pmap():
    """The sharded (jit + mesh) update equals the pmap one over 2 steps, with accumulation, and keeps its
    params and AdamW moments sharded over the data axis."""
    from gopd_jax.scoring import make_mesh

    opt, state = new_state()
    devices = jax.local_devices()[:N_DEV]
    mesh = make_mesh(N_DEV, "data")
    pm_step = train.pmap_update_step(LOSS, opt, devices=devices, accum_steps=2)
    fs_step = train.fsdp_update_step(LOSS, opt, mesh, accum_steps=2)
    pm_state = train.replicate(state, devices)
    fs_state = jax.block_until_ready(train.fsdp_shard(state, mesh))
    for i in range(2):
        batch = train.shard_batch(make_batch(i, b=16), N_DEV)
        batch["loss_mask"][:, 0, 5:] = 0.0  # unequal token counts per micro-batch: weighting must still agree
        pm_state, pm_m = jax.block_until_ready(pm_step(pm_state, batch))
        fs_state, fs_m = jax.block_until_ready(fs_step(fs_state, batch))
        for k in ("loss", "grad_norm", "n_tokens"):
            np.testing.assert_allclose(float(fs_m[k]), np.asarray(pm_m[k])[0], rtol=1e-5, atol=1e-6)
    host = train.unreplicate(pm_state)
    assert_trees_close(jax.device_get(fs_state.params), host.params)
    assert_trees_close(jax.device_get(fs_state.opt_state), host.opt_state)
    embed = fs_state.params["embed"]
    assert embed.addressable_shards[0].data.shape == (CFG.vocab_size // N_DEV, CFG.hidden_size)
    mu = fs_state.opt_state[1][0].mu["embed"]
    assert mu.addressable_shards[0].data.shape == (CFG.vocab_size // N_DEV, CFG.hidden_size)
    policy = jax.block_until_ready(train.policy_params(fs_state.params, jnp.bfloat16, mesh))
    assert policy["embed"].dtype == jnp.bfloat16 and policy["embed"].addressable_shards[0].data.shape == \
        embed.shape


def test_fsdp_spec():
    assert train.fsdp_spec((6, 8, 4), "data", 4) == jax.sharding.PartitionSpec(None, "data", None)
    assert train.fsdp_spec((6, 3), "data", 4) == jax.sharding.PartitionSpec()
    assert train.fsdp_spec((), "data", 4) == jax.sharding.PartitionSpec()


TEACHER_CFG = Qwen3Config(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, head_dim=8, tie_word_embeddings=False,
                          num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)


def exact_batch(seed, b=8, t=16):
    batch = make_batch(seed, b, t)
    rng = np.random.default_rng(seed)
    owner = rng.random((b, 1)) < 0.5
    mask = batch.pop("loss_mask")
    return {**batch, "student_mask": mask * ~owner, "teacher_mask": mask * owner,
            "old_logprobs": np.zeros((b, t), np.float32), "teacher_logprobs": np.zeros((b, t), np.float32)}


def test_exact_estimator_teacher_on_device_matches_precomputed_hidden():
    from gopd_jax.losses import LossConfig, distill_loss
    from gopd_jax.models import forward_hidden, output_head

    params = init_params(CFG, jax.random.PRNGKey(0))
    t_params = init_params(TEACHER_CFG, jax.random.PRNGKey(5))
    batch = exact_batch(0)
    cfg = LossConfig(estimator="exact", chunk=8)
    on_device = functools.partial(train.distill_loss_fn, config=CFG, loss_config=cfg, teacher_config=TEACHER_CFG)
    precomputed = functools.partial(train.distill_loss_fn, config=CFG, loss_config=cfg)
    (l1, m1), g1 = jax.jit(jax.value_and_grad(on_device, has_aux=True))(params, batch, 0.3, teacher_params=t_params)

    def reference(p):  # the teacher's hidden states computed apart, handed to the loss
        return distill_loss(forward_hidden(p, CFG, batch["tokens"]), output_head(p, CFG), batch, 0.3, cfg,
                            teacher_hidden=forward_hidden(t_params, TEACHER_CFG, batch["tokens"]),
                            teacher_head=output_head(t_params, TEACHER_CFG))
    (l2, m2), g2 = jax.jit(jax.value_and_grad(reference, has_aux=True))(params)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    assert float(l1) > 0
    assert_trees_close(g1, g2, tol=1e-6)
    with pytest.raises(ValueError, match="teacher_config"):
        precomputed(params, batch, 0.3, teacher_params=t_params)


@pytest.mark.multidevice
@pytest.mark.timeout(300)
def test_fsdp_exact_with_sharded_teacher_matches_pmap():
    """Exact estimator, teacher forward inside the step: FSDP student + expert-sharded teacher == pmap student
    + a teacher copy per device."""
    from gopd_jax.losses import LossConfig
    from gopd_jax.scoring import make_mesh, shard_params

    opt, state = new_state()
    t_params = init_params(TEACHER_CFG, jax.random.PRNGKey(5))
    loss = functools.partial(train.distill_loss_fn, config=CFG, loss_config=LossConfig(estimator="exact", chunk=8),
                             teacher_config=TEACHER_CFG)
    devices = jax.local_devices()[:N_DEV]
    batch = train.shard_batch(exact_batch(1), N_DEV)
    pm_state, pm_m = jax.block_until_ready(train.pmap_update_step(loss, opt, devices=devices)(
        train.replicate(state, devices), batch, beta=jnp.float32(0.3), teacher_params=t_params))
    sharded_teacher, sharded_cfg = shard_params(t_params, TEACHER_CFG, make_mesh(N_DEV), "expert")
    sharded_loss = functools.partial(loss, teacher_config=sharded_cfg)  # its MoE layers run expert parallel
    fs_state = jax.block_until_ready(train.fsdp_shard(state, make_mesh(N_DEV, "data")))
    fs_state, fs_m = jax.block_until_ready(train.fsdp_update_step(sharded_loss, opt, make_mesh(N_DEV, "data"))(
        fs_state, batch, beta=jnp.float32(0.3), teacher_params=sharded_teacher))
    np.testing.assert_allclose(float(fs_m["loss"]), np.asarray(pm_m["loss"])[0], rtol=1e-5)
    # Expert parallel adds the experts' outputs across devices in another order (teacher hidden states agree to
    # ~1 ulp); AdamW's first, sign-like step (lr 1e-2) turns that into ~1e-5 on near-zero gradients, where a
    # wrong gradient would move a weight by ~1e-2.
    assert_trees_close(jax.device_get(fs_state.params), train.unreplicate(pm_state).params, tol=1e-4)


@pytest.mark.timeout(300)
def test_remat_policies_give_the_same_gradients():
    params = init_params(CFG, jax.random.PRNGKey(0))
    batch = make_batch(0)
    grads = {r: jax.jit(jax.grad(lambda p, r=r: train.sft_loss_fn(p, batch, CFG, chunk=8, remat=r)[0]))(params)
             for r in ("none", "full", "dots")}
    assert_trees_close(grads["full"], grads["none"], tol=1e-6)
    assert_trees_close(grads["dots"], grads["none"], tol=1e-6)
    with pytest.raises(ValueError, match="remat must be one of"):
        train.sft_loss_fn(params, batch, CFG, remat="some")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs a GPU"):
            train.sft_loss_fn(params, batch, CFG, attention="cudnn")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention runs on GPUs only")
@pytest.mark.timeout(300)
def test_cudnn_training_attention_matches_xla_on_gpu():
    cfg = Qwen3Config(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    params = init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg.vocab_size, (2, 1024)).astype(np.int32)  # > ATTENTION_BLOCK: blocked XLA path
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": np.ones(tokens.shape, np.float32)}

    def run(attention):
        loss = train.with_compute_dtype(functools.partial(train.sft_loss_fn, config=cfg, attention=attention),
                                        jnp.bfloat16)
        return jax.jit(jax.value_and_grad(lambda p: loss(p, batch)[0]))(params)

    (l_x, g_x), (l_c, g_c) = run("xla"), run("cudnn")
    np.testing.assert_allclose(float(l_c), float(l_x), rtol=2e-2)
    for a, b in zip(jax.tree.leaves(g_c), jax.tree.leaves(g_x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-3 + 5e-2 * float(np.abs(b).max()))
