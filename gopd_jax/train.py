"""Train state, optimizer and the data-parallel update step (docs/PAPER.md §2).

The update step is one pure function `step(state, batch, **loss_kwargs) -> (state, metrics)` that is either
jitted on one device (`jit_update_step`) or pmapped over local devices (`pmap_update_step`); the two differ
only in whether gradients and metrics are averaged over a named device axis.

Loss aggregation under sharding and accumulation: each micro-batch's loss is whatever `loss_fn` returns
and the step averages them with equal weight over micro-batches and devices; with host-normalised mask
weights (LossConfig aggregation "weighted_sum", batch.normalise_masks) that average is the exact token mean
of the global batch. Logged metrics: token counts (n_*) and `losses.Ratio` metrics are summed over
micro-batches and devices (a Ratio's numerator and denominator separately, divided once by
`merge_metrics`); other scalars are averaged.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gopd_jax import losses
from gopd_jax.models import Qwen3Config, forward_hidden, output_head

LossFn = Callable[..., tuple[jax.Array, dict]]  # loss_fn(params, batch, **kw) -> (scalar loss, scalar metrics)


class TrainState(NamedTuple):
    """Everything an update needs, as a plain pytree (checkpointable as is).

    key is the run's base PRNG key (raw uint32[2], from `jax.random.PRNGKey`); derive per-step randomness as
    `jax.random.fold_in(key, step)` so a restored (key, step) pair reproduces a run exactly.
    step counts update steps attempted (batches consumed), including skipped non-finite ones.
    """
    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


def make_optimizer(learning_rate: Union[float, optax.Schedule] = 1e-6, *, weight_decay: float = 0.0,
                   clip_norm: float = 1.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8) -> optax.GradientTransformation:
    """AdamW behind global-norm clipping (paper: lr 1e-6, clip 1.0)."""
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))


def init_train_state(params, optimizer: optax.GradientTransformation, key: jax.Array) -> TrainState:
    return TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32),
                      key=jnp.asarray(key, jnp.uint32))


# ---- the update step ----------------------------------------------------------------------------------------

def _is_count(name: str) -> bool:
    """Metrics named n_* are token/row counts: summed over micro-batches and devices, not averaged."""
    return name.startswith("n_")


def _reduce_metrics(metrics: dict, add, average) -> dict:
    """Counts and Ratio parts are added, other scalars averaged."""
    def one(name, v):
        if isinstance(v, losses.Ratio):
            return losses.Ratio(add(v.num), add(v.den))
        return add(v) if _is_count(name) else average(v)
    return {k: one(k, v) for k, v in metrics.items()}


def merge_metrics(updates: Sequence[dict]) -> dict[str, float]:
    """Host floats from the metrics of one or more update steps (e.g. PPO mini-batch updates of one rollout
    batch): counts and Ratio parts summed over the updates and Ratios divided once; other scalars averaged.
    Pass the per-update metrics as returned by a jitted step, or `unreplicate`d from a pmapped one."""
    if not updates:
        raise ValueError("merge_metrics needs the metrics of at least one update")
    host = [jax.device_get(m) for m in updates]
    merged = _reduce_metrics(jax.tree.map(lambda *xs: np.stack([np.asarray(x, np.float64) for x in xs]), *host),
                             lambda x: x.sum(0), lambda x: x.mean(0))
    return {k: float(v) for k, v in losses.resolve_ratios(merged).items()}


def _split_micro(batch, accum_steps: int):
    def split(x):
        if x.shape[0] % accum_steps:
            raise ValueError(f"per-device batch size {x.shape[0]} is not divisible by accum_steps={accum_steps}")
        return x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:])
    return jax.tree.map(split, batch)


def make_update_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                     axis_name: Optional[str] = "data", accum_steps: int = 1):
    """Build `step(state, batch, **loss_kwargs) -> (state, metrics)`.

    loss_fn(params, batch, **loss_kwargs) -> (loss, metrics): bind static arguments (model config, loss
    config) with functools.partial; loss_kwargs are traced values (e.g. beta) passed through unchanged.
    axis_name: the pmap axis to average gradients/metrics over, or None for a single-device step.
    accum_steps: the (per-device) batch is split into this many equal micro-batches, run sequentially with
    `lax.scan`, and their gradients averaged, so a batch larger than device memory still fits.

    Non-finite loss or gradients: the update is skipped (params and opt_state unchanged, so the optimizer's
    own count and lr schedule do not advance), state.step still advances, and metrics["skipped"] is 1.
    Metrics also carry "grad_norm" (before clipping).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch, **loss_kwargs):
        def micro(grad_sum, mb):
            (loss, metrics), grads = grad_fn(state.params, mb, **loss_kwargs)
            return jax.tree.map(jnp.add, grad_sum, grads), {**metrics, "loss": loss}

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grad_sum, metrics = lax.scan(micro, zeros, _split_micro(batch, accum_steps))
        grads = jax.tree.map(lambda g: g / accum_steps, grad_sum)
        metrics = _reduce_metrics(metrics, lambda x: jnp.sum(x, 0), lambda x: jnp.mean(x, 0))
        if axis_name is not None:
            grads = lax.pmean(grads, axis_name)
            metrics = _reduce_metrics(metrics, lambda x: lax.psum(x, axis_name), lambda x: lax.pmean(x, axis_name))

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
        new_state = TrainState(params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
                               step=state.step + 1, key=state.key)
        metrics = {**metrics, "grad_norm": grad_norm, "skipped": 1.0 - finite.astype(jnp.float32)}
        return new_state, metrics

    return step


MAX_CONSECUTIVE_SKIPS = 3


def count_skips(consecutive: int, skipped: float, limit: int | None = None) -> int:
    """The number of consecutive skipped steps up to this one (`skipped`: the fraction of the step's updates
    skipped as non-finite; a step counts when all were); FloatingPointError once it reaches `limit`: a skipped
    update changes nothing, so a run that keeps skipping would train nothing to the end."""
    consecutive = consecutive + 1 if skipped >= 1.0 else 0
    if consecutive >= (limit or MAX_CONSECUTIVE_SKIPS):
        raise FloatingPointError(
            f"{consecutive} consecutive steps had a non-finite loss or gradient and were skipped, so nothing is being "
            "trained. Likely causes: student or teacher weights that overflow (check the checkpoints; try "
            "--compute-dtype float32), or a learning rate so high that an update diverged (lower --learning-rate).")
    return consecutive


def jit_update_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, accum_steps: int = 1):
    """Single-device update step, jitted, with the state donated."""
    return jax.jit(make_update_step(loss_fn, optimizer, axis_name=None, accum_steps=accum_steps),
                   donate_argnums=0)


def pmap_update_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, axis_name: str = "data",
                     accum_steps: int = 1, devices: Optional[Sequence[jax.Device]] = None):
    """Data-parallel update step over `devices` (default: all local devices), with the state donated.

    Call as `step(state, batch, **loss_kwargs)` with state from `replicate` and batch from `shard_batch`;
    loss_kwargs (e.g. beta) are host scalars/arrays broadcast to every device.
    """
    inner = make_update_step(loss_fn, optimizer, axis_name=axis_name, accum_steps=accum_steps)
    # loss_kwargs travel as one positional dict so pmap can broadcast them (in_axes None) rather than map them.
    mapped = jax.pmap(lambda state, batch, kw: inner(state, batch, **kw), axis_name=axis_name,
                      in_axes=(0, 0, None), donate_argnums=0, devices=devices)
    return lambda state, batch, **loss_kwargs: mapped(state, batch, loss_kwargs)


# ---- FSDP-style sharded update (jit over a mesh) ------------------------------------------------------------

def fsdp_spec(shape: tuple[int, ...], axis: str, size: int) -> PartitionSpec:
    """Split the largest dimension divisible by `size` over `axis`; replicate leaves with none (scalars)."""
    dims = [d for d in sorted(range(len(shape)), key=lambda d: -shape[d]) if shape[d] % size == 0]
    if not dims:
        return PartitionSpec()
    parts = [None] * len(shape)
    parts[dims[0]] = axis
    return PartitionSpec(*parts)


def fsdp_shard(tree, mesh: Mesh):
    """Place a pytree (train state, params) with every leaf sharded over the mesh's single (data) axis."""
    axis, = mesh.axis_names
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, fsdp_spec(np.shape(x), axis,
                                                                                  mesh.shape[axis]))), tree)


def fsdp_update_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh: Mesh, *, accum_steps: int = 1):
    """Data-parallel update with the float32 params and AdamW state sharded over `mesh` (FSDP-style: XLA
    gathers each weight where it is used and reduce-scatters its gradient), for students whose replicated
    state does not fit one device.

    Same calling convention and the same numbers as `pmap_update_step`: state from `fsdp_shard`, batch from
    `shard_batch` ([n_devices, rows, ...]), loss_kwargs broadcast; metrics come back already reduced over
    devices (pass them to `merge_metrics` as they are, where a pmap step's need `unreplicate`). Each
    device's rows form their own loss group (the loss is vmapped over the device axis and averaged), so
    per-group means weigh exactly as the pmap step's per-device means do."""
    axis, = mesh.axis_names
    n = mesh.shape[axis]

    def grouped(params, batch, **kw):
        loss, metrics = jax.vmap(lambda b: loss_fn(params, b, **kw))(batch)
        return jnp.mean(loss), _reduce_metrics(metrics, lambda x: jnp.sum(x, 0), lambda x: jnp.mean(x, 0))

    inner = make_update_step(grouped, optimizer, axis_name=None, accum_steps=accum_steps)

    def step(state, batch, kw):
        def regroup(x):  # [n, rows, ...] -> [accum * n, rows / accum, ...], micro-batch major
            if x.shape[0] != n or x.shape[1] % accum_steps:
                raise ValueError(f"batch leaf of shape {x.shape}: expected [{n} devices, rows divisible by "
                                 f"accum_steps={accum_steps}, ...] (use shard_batch)")
            x = x.reshape(n, accum_steps, x.shape[1] // accum_steps, *x.shape[2:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(
                x, NamedSharding(mesh, PartitionSpec(None, axis))).reshape(-1, *x.shape[2:])
        return inner(state, jax.tree.map(regroup, batch), **kw)

    batch_sharding = NamedSharding(mesh, PartitionSpec(axis))
    jitted = jax.jit(step, donate_argnums=0)

    def call(state, batch, **loss_kwargs):
        return jitted(state, jax.device_put(batch, batch_sharding), loss_kwargs)
    return call


def policy_params(params, dtype, mesh: Optional[Mesh] = None):
    """The student's weights for generation, cast to `dtype`: from a pmap state (leading device axis) when
    mesh is None, else from an FSDP state, gathered to a full copy on every device of `mesh`."""
    if mesh is None:
        return jax.tree.map(lambda x: x.astype(dtype), unreplicate(params))
    return jax.tree.map(lambda x: jax.device_put(x.astype(dtype), NamedSharding(mesh, PartitionSpec())), params)


# ---- host <-> device helpers for pmap ------------------------------------------------------------------------

def replicate(tree, devices: Optional[Sequence[jax.Device]] = None):
    """Copy every leaf to each device, stacked on a new leading device axis (the layout pmap expects).

    Each device receives one copy directly; no [n_devices, ...] stack is ever built on the host."""
    devices = list(devices or jax.local_devices())
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ("d",)),
                                          jax.sharding.PartitionSpec("d"))

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        shards = [jax.device_put(x[None], d) for d in devices]
        return jax.make_array_from_single_device_arrays((len(devices), *x.shape), sharding, shards)

    return jax.tree.map(put, tree)


def unreplicate(tree):
    """The first device's copy of a replicated tree (no cross-device traffic)."""
    return jax.tree.map(lambda x: x.addressable_data(0)[0] if isinstance(x, jax.Array) else x[0], tree)


def shard_batch(batch, n_devices: int):
    """Reshape every [global_B, ...] leaf to [n_devices, global_B / n_devices, ...]."""
    def shard(x):
        if x.shape[0] % n_devices:
            raise ValueError(f"global batch size {x.shape[0]} is not divisible by the {n_devices} devices; "
                             "pad or drop rows so every device gets the same number")
        return x.reshape(n_devices, x.shape[0] // n_devices, *x.shape[1:])
    return jax.tree.map(shard, batch)


# ---- losses -------------------------------------------------------------------------------------------------

def sft_loss_fn(params, batch, config: Qwen3Config, chunk: int = losses.DEFAULT_CHUNK, attention: str = "xla",
                remat: str = "none", prompt_weight: float = 0.0):
    """Token-mean cross-entropy on batch["targets"] where batch["loss_mask"] is set (assistant tokens).

    batch: "tokens", "targets", "loss_mask", all [B, T]. prompt_weight > 0 also trains the prompt's tokens
    (batch["prompt_mask"]) at that weight per token: a model trained from scratch then learns to read and copy
    its context (observations, admissible actions) from every token instead of only the few of each reply.
    metrics["reply_loss"] is the assistant tokens' loss alone. Bind config, prompt_weight (and the static
    training options attention / remat, see `models.qwen3.check_train_options`) with functools.partial."""
    hidden = forward_hidden(params, config, batch["tokens"], attention, remat)
    # One pass through the output head (the costliest matmul at a real vocabulary) serves both losses.
    logp, _ = losses.token_logprobs(hidden, output_head(params, config), batch["targets"], chunk=chunk)
    reply_loss = losses.masked_nll(logp, batch["loss_mask"])
    loss = (losses.masked_nll(logp, batch["loss_mask"] + prompt_weight * batch["prompt_mask"]) if prompt_weight
            else reply_loss)
    return loss, {"n_tokens": jnp.sum(batch["loss_mask"].astype(jnp.float32)), "reply_loss": reply_loss}


def distill_loss_fn(params, batch, beta, teacher_params=None, *, config: Qwen3Config,
                    loss_config: losses.LossConfig = losses.LossConfig(), teacher_config: Optional[Qwen3Config] = None,
                    attention: str = "xla", remat: str = "none"):
    """The Guided-OPD loss of the student `params` on a rollout batch (see losses.distill_loss).

    batch: "tokens" plus the owner masks and log-probs. The exact estimator needs the teacher: pass
    `teacher_params` (loss kwarg; bind `teacher_config`) and its hidden states are computed here, per
    micro-batch on device and without gradient, so no [B, T, D_teacher] array ever exists for the whole
    batch. Bind config, loss_config, teacher_config and the training options with functools.partial; beta
    (traced) and teacher_params travel as loss kwargs."""
    if teacher_params is not None and teacher_config is None:
        raise ValueError("teacher_params needs teacher_config (bind it with functools.partial)")
    hidden = forward_hidden(params, config, batch["tokens"], attention, remat)
    t_hidden = t_head = None
    if teacher_params is not None:
        teacher_params = lax.stop_gradient(teacher_params)
        t_hidden = forward_hidden(teacher_params, teacher_config, batch["tokens"])
        t_head = output_head(teacher_params, teacher_config)
    return losses.distill_loss(hidden, output_head(params, config), batch, beta, loss_config,
                               teacher_hidden=t_hidden, teacher_head=t_head)


def with_compute_dtype(loss_fn: LossFn, dtype) -> LossFn:
    """Mixed precision: keep float32 master params in the state, run the loss with params cast to dtype
    (gradients flow back to the float32 copy)."""
    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    @functools.wraps(loss_fn)
    def wrapped(params, batch, **kw):
        return loss_fn(jax.tree.map(cast, params), batch, **kw)
    return wrapped
