"""Teacher scoring (docs/PAPER.md §2): log-probs of the sampled tokens, or hidden states for the exact KL.

The teacher can be placed across devices with `shard_params` (tensor or expert parallel over one "model"
mesh axis); the same jitted functions then run on the sharded params with the config it returns. Tensor
parallel leaves the collectives to XLA's sharding propagation; expert parallel runs each MoE layer under
`shard_map` on the experts each device holds (`models.qwen3.moe`, via `config.expert_mesh`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gopd_jax import losses
from gopd_jax.models import Qwen3Config, forward_hidden, output_head


@functools.partial(jax.jit, static_argnames=("config", "chunk"))
def teacher_logprobs(params, config: Qwen3Config, tokens, targets, mask=None, chunk: int = losses.DEFAULT_CHUNK):
    """float32 [B, T] log p_teacher(targets[:, t] | tokens[:, :t+1]); 0 where mask (if given) is 0.

    Logits are formed `chunk` time steps at a time, so no [B, T, V] tensor is materialised."""
    hidden = forward_hidden(params, config, tokens)
    logp, _ = losses.token_logprobs(hidden, output_head(params, config), targets, chunk=chunk)
    return logp if mask is None else jnp.where(mask > 0, logp, 0.0)


@functools.partial(jax.jit, static_argnames=("config",))
def teacher_hidden(params, config: Qwen3Config, tokens):
    """[B, T, D] final hidden states for the exact-KL loss (pair with `output_head(params, config)`)."""
    return forward_hidden(params, config, tokens)


def check_compatible(student_config: Qwen3Config, teacher_config: Qwen3Config, student_tokenizer=None,
                     teacher_tokenizer=None) -> None:
    """Raise ValueError unless student and teacher share a vocabulary (distillation compares token ids)."""
    if student_config.vocab_size != teacher_config.vocab_size:
        raise ValueError(f"student vocab_size {student_config.vocab_size} != teacher vocab_size "
                         f"{teacher_config.vocab_size}: teacher and student must share a tokenizer")
    if student_tokenizer is not None and teacher_tokenizer is not None:
        if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
            raise ValueError("student and teacher tokenizer vocabularies differ: teacher and student must share "
                             "a tokenizer")


def batch_logprobs(params, config: Qwen3Config, batch: dict, rows: int) -> np.ndarray:
    """log p(targets) under (params, config) for every row of a host batch, `rows` rows per jitted call."""
    return np.concatenate([np.asarray(teacher_logprobs(params, config, jnp.asarray(batch["tokens"][i:i + rows]),
                                                       jnp.asarray(batch["targets"][i:i + rows])))
                           for i in range(0, batch["tokens"].shape[0], rows)])


def score_batch(batch: dict, teacher, student, rows: int, loss_config: losses.LossConfig) -> dict:
    """What the loss needs from the models, added to a training batch (returns a new dict).

    teacher / student: objects with .params and .config (records.Policy). Fills "teacher_logprobs" on the
    tokens that carry a sampled KL; for a reverse KL on teacher-owned tokens also the student's pre-update
    log-probs there ("old_logprobs", the PPO ratio's denominator, fixed for every update of the step). The
    exact estimator's teacher forward runs inside the update step (train.distill_loss_fn(teacher_params=...))."""
    out = dict(batch)
    owned = batch["student_mask"] > 0
    if loss_config.teacher_kl == "reverse" and loss_config.estimator == "sampled":
        teacher_tokens = batch["teacher_mask"] > 0
        owned = owned | teacher_tokens
        out["old_logprobs"] = np.where(teacher_tokens, batch_logprobs(student.params, student.config, batch, rows),
                                       batch["old_logprobs"])
    out["teacher_logprobs"] = (np.where(owned, batch_logprobs(teacher.params, teacher.config, batch, rows), 0.0)
                               .astype(np.float32) if owned.any() else np.zeros(owned.shape, np.float32))
    return out


# ---- sharded teacher -------------------------------------------------------------------------------------------

def make_mesh(n_devices: Optional[int] = None, axis: str = "model") -> Mesh:
    """A 1-D mesh over the first n local devices (explicit Mesh: same behaviour on jax 0.10 and 0.11)."""
    devices = jax.devices()[:n_devices] if n_devices else jax.devices()
    return Mesh(np.array(devices), (axis,))


# Which dimension of each weight is split over the "model" axis. Tensor parallel: attention heads, MLP /
# expert intermediate, vocabulary. Expert parallel: the expert axis of MoE weights. Unlisted leaves (norms,
# router) are replicated.
_TENSOR_DIM = {"embed": 0, "lm_head": 1, "q": 1, "k": 1, "v": 1, "o": 0, "gate": -1, "up": -1, "down": -2}
_EXPERT_DIM = {"gate": 0, "up": 0, "down": 0}


def _shard_dim(path, strategy: str) -> Optional[int]:
    names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    if strategy == "tensor":
        return _TENSOR_DIM.get(names[-1])
    if strategy == "expert":
        return _EXPERT_DIM.get(names[-1]) if "moe" in names else None
    raise ValueError(f"strategy must be 'tensor' or 'expert', got {strategy!r}")


def leaf_spec(path, shape: tuple[int, ...], strategy: str, axis: str, size: int) -> PartitionSpec:
    """The PartitionSpec of one teacher weight (by its pytree path and shape) split `size` ways over `axis`.
    A dimension not divisible by `size` stays replicated. Shared with `device_plan`, which sizes shards of
    abstract shapes before any device holds them."""
    dim = _shard_dim(path, strategy)
    if dim is None or shape[dim] % size:
        return PartitionSpec()
    parts = [None] * len(shape)
    parts[dim] = axis
    return PartitionSpec(*parts)


def param_specs(params, mesh: Mesh, strategy: str = "tensor"):
    """PartitionSpec per leaf. A dimension not divisible by the mesh axis size stays replicated."""
    axis, = mesh.axis_names
    return jax.tree_util.tree_map_with_path(
        lambda path, x: leaf_spec(path, x.shape, strategy, axis, mesh.shape[axis]), params)


def shard_params(params, config: Qwen3Config, mesh: Mesh, strategy: str = "tensor"):
    """Place the teacher's params across `mesh` ("tensor" or, for MoE teachers, "expert" parallel).

    Returns (params, config): run the placed params with this config. For "expert" it carries the mesh
    (`expert_mesh`), so each MoE layer runs on the experts each device holds, combined by one psum."""
    config = dataclasses.replace(config, expert_mesh=mesh if strategy == "expert" else None)  # checks "expert"
    specs = param_specs(params, mesh, strategy)
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs), config
