"""Where the teacher and the student live, and whether they fit: a memory plan per device.

`make_plan` is pure arithmetic over the two configs and the run's shapes (no device is touched, so a plan for
8 GPUs can be checked on a laptop). It picks

- the teacher layout: "replicated" (a full copy per device), or sharded over a 1-D mesh of all devices:
  "expert" parallel for MoE teachers whose expert count divides by the devices, "tensor" parallel otherwise
  (the strategies of `scoring.shard_params`);
- the student update: "pmap" data parallel (float32 params and AdamW state replicated on every device; the
  default) or "fsdp" (`train.fsdp_update_step`: the same state sharded over the data axis, gathered per use),

preferring, in order, (replicated, pmap), (sharded, pmap), (replicated, fsdp), (sharded, fsdp): the first whose
estimated peak fits `headroom` x the device memory. Either choice can be forced. Sizes are per device:

    resident  teacher weights + student float32 params and AdamW moments + the student's generation copy
    rollout   KV cache (and prefill activations) of the model generating, for `rollout_rows` rows of
              `max_prompt_tokens + max_new_tokens` tokens
    scoring   the teacher's forward over `n_devices * micro_batch_rows` rows (one scoring call)
    update    gradients (accumulator + one micro-batch's), the compute-dtype copy of the params, saved
              activations of one micro-batch (per the `remat` policy), the logits chunk; with the exact
              estimator also the teacher's forward over that micro-batch
    peak      resident + the largest of rollout / scoring / update

Activation sizes are estimates (what the forward saves per token and layer, and the largest transients);
`compiled.memory_analysis()` of the jitted step is the measurement where a device is at hand.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gopd_jax import losses, scoring, train
from gopd_jax.models import Qwen3Config, init_params
from gopd_jax.models.qwen3 import attention_block

TEACHER_LAYOUTS = ("auto", "replicated", "tensor", "expert")
STUDENT_UPDATES = ("auto", "pmap", "fsdp")
GIB = 2 ** 30


def _bytes(dtype) -> int:
    return jnp.dtype(dtype).itemsize


@functools.lru_cache(maxsize=16)
def _abstract_leaves(config: Qwen3Config) -> tuple:
    """((pytree path, shape), ...) of every weight, without allocating any."""
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0), jnp.float32))
    return tuple((path, tuple(x.shape)) for path, x in jax.tree_util.tree_flatten_with_path(shapes)[0])


def _shard_elements(shape, spec, n: int) -> int:
    """Elements one device holds of an array of `shape` laid out by `spec` over n devices."""
    size = int(np.prod(shape, dtype=np.int64))
    return size // n if any(p is not None for p in spec) else size


def teacher_elements_per_device(config: Qwen3Config, layout: str, n: int) -> int:
    """Weight elements one device holds under `layout` ("replicated", "tensor", "expert")."""
    leaves = _abstract_leaves(config)
    if layout == "replicated" or n == 1:
        return sum(int(np.prod(s, dtype=np.int64)) for _, s in leaves)
    return sum(_shard_elements(s, scoring.leaf_spec(p, s, layout, "model", n), n) for p, s in leaves)


def student_elements_per_device(config: Qwen3Config, update: str, n: int) -> int:
    """Param elements one device holds of the student's float32 state (params; each AdamW moment alike)."""
    leaves = _abstract_leaves(config)
    if update == "pmap" or n == 1:
        return sum(int(np.prod(s, dtype=np.int64)) for _, s in leaves)
    return sum(_shard_elements(s, train.fsdp_spec(s, "data", n), n) for _, s in leaves)


def kv_bytes_per_token(config: Qwen3Config, dtype) -> int:
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * _bytes(dtype)


def _ffn_width(config: Qwen3Config) -> int:
    """Intermediate activations per token of the widest feed-forward (MoE: one copy per routed expert)."""
    moe = config.num_experts_per_tok * config.moe_intermediate_size if config.is_moe else 0
    return max(config.intermediate_size if not config.is_moe or config.mlp_only_layers else 0, moe)


def saved_activation_bytes_per_token(config: Qwen3Config, dtype, remat: str = "none") -> int:
    """What the backward pass keeps per token over all layers (models.qwen3.REMAT_POLICIES). "none": the
    layer input and two norm outputs, q/k/v and the attention output, gate/up/activation/product of the
    feed-forward, and the float32 norm copies; "dots": the projections' outputs only; "full": the layer
    input only, plus one layer's worth recomputed during the backward pass."""
    c = config
    qkv = (2 * c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    everything = _bytes(dtype) * (3 * c.hidden_size + qkv + 4 * _ffn_width(c)) + 4 * 2 * c.hidden_size
    if remat == "none":
        return everything * c.num_hidden_layers
    if remat == "dots":
        return _bytes(dtype) * (qkv + 2 * c.hidden_size + 2 * _ffn_width(c)) * c.num_hidden_layers
    if remat == "full":
        return _bytes(dtype) * c.hidden_size * c.num_hidden_layers + everything
    raise ValueError(f"remat must be 'none', 'dots' or 'full', got {remat!r}")


def _forward_transient_bytes(config: Qwen3Config, rows: int, tokens: int, dtype) -> int:
    """Largest live buffers of one layer's forward (no saving): the feed-forward intermediates and one query
    block of float32 attention scores, plus the residual stream."""
    c = config
    ffn = 3 * rows * tokens * _ffn_width(c) * _bytes(dtype)
    scores = rows * c.num_attention_heads * min(tokens, attention_block(tokens)) * tokens * 4
    return ffn + scores + 4 * rows * tokens * c.hidden_size * _bytes(dtype)


def _logits_chunk_bytes(config: Qwen3Config, rows: int, chunk: int, models: int = 1) -> int:
    """float32 logits of one chunk and their softmax / gradient buffers (x3), per model involved."""
    return 3 * models * rows * chunk * config.vocab_size * 4


@dataclasses.dataclass(frozen=True)
class DevicePlan:
    """A chosen layout and its per-device memory estimate (bytes). See the module docstring."""

    n_devices: int
    device_bytes: int
    headroom: float
    teacher_layout: str  # replicated | tensor | expert
    student_update: str  # pmap | fsdp
    components: dict  # name -> bytes per device
    phases: dict  # resident / rollout / scoring / update / peak -> bytes per device
    forced: bool
    shapes: str  # one line: the run shapes the plan was made for

    @property
    def fits(self) -> bool:
        return self.phases["peak"] <= self.headroom * self.device_bytes

    @property
    def teacher_sharded(self) -> bool:
        return self.teacher_layout != "replicated"

    def mesh(self, axis: str) -> Mesh:
        """A 1-D mesh over the plan's devices (the teacher uses axis "model", the FSDP student "data")."""
        return scoring.make_mesh(self.n_devices, axis)

    def describe(self) -> str:
        def g(x):
            return f"{x / GIB:8.2f} GiB"
        lines = [f"device plan: {self.n_devices} device(s) x {self.device_bytes / GIB:.1f} GiB "
                 f"(budget {self.headroom:.0%}); {self.shapes}",
                 f"  teacher: {self.teacher_layout}; student update: {self.student_update}"
                 + (" (forced)" if self.forced else ""),
                 "  per device:"]
        lines += [f"    {name:<34}{g(v)}" for name, v in self.components.items()]
        lines += ["  phases: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.phases.items()) + " GiB"]
        if not self.fits:
            lines.append(f"  WARNING: the estimated peak {self.phases['peak'] / GIB:.2f} GiB exceeds the budget "
                         f"{self.headroom * self.device_bytes / GIB:.2f} GiB")
        return "\n".join(lines)


def _estimate(teacher: Qwen3Config, student: Qwen3Config, *, n: int, teacher_layout: str, student_update: str,
              rollout_rows: int, max_prompt_tokens: int, max_new_tokens: int, micro_batch_rows: int,
              teacher_dtype, compute_dtype, estimator: str, chunk: int, remat: str) -> tuple[dict, dict]:
    seq = max_prompt_tokens + max_new_tokens
    t_elems = teacher_elements_per_device(teacher, teacher_layout, n)
    s_elems = student_elements_per_device(student, student_update, n)
    s_full = student.num_params()
    kv_split = n if (teacher_layout == "tensor" and teacher.num_key_value_heads % n == 0) else 1
    c = {
        "teacher weights": t_elems * _bytes(teacher_dtype),
        "student params (f32)": s_elems * 4,
        "student AdamW moments (f32)": 2 * s_elems * 4,
        "student generation copy": s_full * _bytes(compute_dtype),
        "teacher KV cache (rollout)": rollout_rows * seq * kv_bytes_per_token(teacher, teacher_dtype) // kv_split,
        "teacher prefill activations": _forward_transient_bytes(teacher, rollout_rows, max_prompt_tokens,
                                                                teacher_dtype) // kv_split,
        "student KV cache (rollout)": rollout_rows * seq * kv_bytes_per_token(student, compute_dtype),
        "student prefill activations": _forward_transient_bytes(student, rollout_rows, max_prompt_tokens,
                                                                compute_dtype),
        "scoring activations": (_forward_transient_bytes(teacher, n * micro_batch_rows, seq, teacher_dtype)
                                + _logits_chunk_bytes(teacher, n * micro_batch_rows, chunk)),
        "update gradients (f32, x2)": 2 * s_elems * 4,
        "update compute copy": s_full * _bytes(compute_dtype),
        "update activations (micro-batch)": (micro_batch_rows * seq
                                             * saved_activation_bytes_per_token(student, compute_dtype, remat)
                                             + _forward_transient_bytes(student, micro_batch_rows, seq, compute_dtype)
                                             + _logits_chunk_bytes(student, micro_batch_rows, chunk,
                                                                   2 if estimator == "exact" else 1)),
    }
    if estimator == "exact":  # the teacher's forward over each micro-batch, inside the update step
        c["update teacher forward (exact)"] = (_forward_transient_bytes(teacher, micro_batch_rows, seq, teacher_dtype)
                                               + micro_batch_rows * seq * teacher.hidden_size * _bytes(teacher_dtype))
    resident = c["teacher weights"] + c["student params (f32)"] + c["student AdamW moments (f32)"] \
        + c["student generation copy"]
    rollout = max(c["teacher KV cache (rollout)"] + c["teacher prefill activations"],
                  c["student KV cache (rollout)"] + c["student prefill activations"])
    update = (c["update gradients (f32, x2)"] + c["update compute copy"] + c["update activations (micro-batch)"]
              + c.get("update teacher forward (exact)", 0))
    phases = {"resident": resident, "rollout": rollout, "scoring": c["scoring activations"], "update": update}
    phases["peak"] = resident + max(rollout, phases["scoring"], update)
    return c, phases


def make_plan(teacher: Qwen3Config, student: Qwen3Config, *, n_devices: int, device_bytes: int, rollout_rows: int,
              max_prompt_tokens: int, max_new_tokens: int, micro_batch_rows: int, teacher_dtype="bfloat16",
              compute_dtype="bfloat16", estimator: str = "sampled", teacher_layout: str = "auto",
              student_update: str = "auto", headroom: float = 0.9, chunk: int = losses.DEFAULT_CHUNK,
              remat: str = "none") -> DevicePlan:
    """The first layout (see the module docstring) whose estimated peak fits; a forced layout is returned
    as is (`plan.fits` and `describe()` say whether it fits). Raises ValueError, naming every size, when no
    layout fits.

    rollout_rows: rows one generation call holds (the episodes generating at once, <= the env workers).
    estimator "exact" with a sharded teacher needs the "fsdp" update: the pmap step would copy the whole
    teacher to every device."""
    if teacher_layout not in TEACHER_LAYOUTS or student_update not in STUDENT_UPDATES:
        raise ValueError(f"teacher_layout must be one of {TEACHER_LAYOUTS} and student_update one of "
                         f"{STUDENT_UPDATES}; got {teacher_layout!r}, {student_update!r}")
    if n_devices < 1 or device_bytes <= 0 or min(rollout_rows, micro_batch_rows, max_new_tokens) < 1:
        raise ValueError(f"need n_devices >= 1, device_bytes > 0 and positive row/token counts; got "
                         f"n_devices={n_devices}, device_bytes={device_bytes}, rollout_rows={rollout_rows}, "
                         f"micro_batch_rows={micro_batch_rows}, max_new_tokens={max_new_tokens}")
    if teacher_layout == "expert" and (not teacher.is_moe or teacher.num_experts % n_devices):
        raise ValueError(f"teacher_layout='expert' needs a MoE teacher whose num_experts ({teacher.num_experts}) "
                         f"is a multiple of the {n_devices} devices; use 'tensor'")
    sharded = "expert" if teacher.is_moe and teacher.num_experts % n_devices == 0 else "tensor"
    teachers = ["replicated"] + ([sharded] if n_devices > 1 else [])
    students = ["pmap"] + (["fsdp"] if n_devices > 1 else [])
    if teacher_layout != "auto":
        teachers = [teacher_layout]
    if student_update != "auto":
        students = [student_update]
    order = [(t, s) for s in students for t in teachers]
    shapes = (f"rollout {rollout_rows} rows x ({max_prompt_tokens} + {max_new_tokens}) tokens, micro-batch "
              f"{micro_batch_rows} rows, teacher {jnp.dtype(teacher_dtype).name} "
              f"{teacher.num_params() / 1e9:.2f}B params, student compute {jnp.dtype(compute_dtype).name} "
              f"{student.num_params() / 1e9:.2f}B params, estimator {estimator}, remat {remat}")
    forced = teacher_layout != "auto" or student_update != "auto"
    tried = []
    for t_layout, s_update in order:
        if estimator == "exact" and t_layout != "replicated" and s_update == "pmap":
            if forced and len(order) == 1:
                raise ValueError("estimator='exact' with a sharded teacher needs student_update='fsdp' (the pmap "
                                 "step would copy the whole teacher to every device)")
            continue
        comps, phases = _estimate(teacher, student, n=n_devices, teacher_layout=t_layout, student_update=s_update,
                                  rollout_rows=rollout_rows, max_prompt_tokens=max_prompt_tokens,
                                  max_new_tokens=max_new_tokens, micro_batch_rows=micro_batch_rows,
                                  teacher_dtype=teacher_dtype, compute_dtype=compute_dtype, estimator=estimator,
                                  chunk=chunk, remat=remat)
        plan = DevicePlan(n_devices, int(device_bytes), headroom, t_layout, s_update, comps, phases, forced, shapes)
        if plan.fits or forced:
            return plan
        tried.append(plan)
    best = min(tried, key=lambda p: p.phases["peak"])
    raise ValueError(
        "no layout fits: estimated peak per device "
        + ", ".join(f"{p.teacher_layout}/{p.student_update} {p.phases['peak'] / GIB:.1f} GiB" for p in tried)
        + f" > budget {headroom * device_bytes / GIB:.1f} GiB. Smallest:\n{best.describe()}\n"
        "Fixes: more devices, shorter max_prompt_tokens / max_new_tokens, fewer env workers (rollout rows), "
        "smaller micro_batch_rows, remat='full', or a smaller student.")


def device_memory_bytes(device: Optional[jax.Device] = None) -> int:
    """Memory one device may use: the accelerator's allocator limit; on CPU the host RAM split between the
    local (possibly simulated) devices."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()


def place_teacher(params, config: Qwen3Config, plan: DevicePlan):
    """(params, config) of the teacher where the plan puts it: sharded over a "model" mesh of the plan's
    devices (`scoring.shard_params`; expert parallel: the config carries the mesh), or, replicated layout, on
    the default device (generation and scoring run there). Host (numpy) params, e.g. from
    `load_hf_checkpoint(..., on_host=True)`, go straight to their shards."""
    if not plan.teacher_sharded:
        return jax.device_put(params), config
    return scoring.shard_params(params, config, plan.mesh("model"), plan.teacher_layout)
