"""One config object per experiment: defaults, command-line overrides, validation before any work starts."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import typing
from pathlib import Path

CURRICULA = ("cosine", "linear", "constant")
ESTIMATORS = ("sampled", "exact")
AGGREGATIONS = ("token_mean", "sequence_mean")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything one training run needs. Defaults are the paper's settings (docs/PAPER.md §3)."""

    name: str = "guided_opd"
    out_dir: str = "runs/guided_opd"
    method: str = "guided_opd"  # a registered method: guided_opd | opd | fixed_beta | tcod_f2b | tcod_b2f | sft
    env: str = "alfworld"
    train_split: str = "train"
    eval_split: str = "valid_unseen"
    data_dir: str = ""  # environment data (ALFWorld: $ALFWORLD_DATA layout); empty: the env's default lookup
    # Models: Hugging Face checkpoint directories. The tokenizer comes from `tokenizer` or the student's directory.
    student: str = ""
    teacher: str = ""
    tokenizer: str = ""
    # Curriculum (the teacher-intervention probability beta over training steps).
    curriculum: str = "cosine"  # cosine | linear | constant
    rho: float = 0.8
    beta: float = 0.0  # for method fixed_beta / curriculum constant
    # Optimisation.
    steps: int = 250
    batch_tasks: int = 64
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    micro_batch_rows: int = 8
    compute_dtype: str = "bfloat16"
    # Device layout (gopd_jax.device_plan): "auto" takes the first that fits the memory plan printed at start.
    teacher_layout: str = "auto"  # auto | replicated | tensor | expert
    student_update: str = "auto"  # auto | pmap (data parallel, state replicated) | fsdp (state sharded)
    # Loss.
    estimator: str = "sampled"  # sampled | exact
    kl_variant: str = "default"  # default | swapped | both_reverse
    aggregation: str = "token_mean"  # token_mean | sequence_mean
    clip_eps: float = 0.2
    # PPO-style updates per rollout batch: the batch is split into `mini_batches` parts, each one optimizer
    # step, repeated `ppo_epochs` times; p_S_old stays the sampling pass's, so the clip can act past the first.
    ppo_epochs: int = 1
    mini_batches: int = 1
    # Rollout.
    max_turns: int = 0  # 0: the paper's per-environment limit
    max_new_tokens: int = 512
    max_prompt_tokens: int = 10_240
    temperature: float = 1.0
    top_p: float = 1.0  # training rollouts; 1.0 = off
    top_k: int = 0  # training rollouts; 0 = off
    # The sampled estimator assumes p_S_old is the model's own distribution: a temperature != 1 or top-p / top-k
    # truncation biases it; set true to train that way anyway.
    allow_biased_sampling: bool = False
    eval_temperature: float = 0.4
    expert: str = "walkthrough"  # whose turns SFT trains on; ALFWorld also has "handcoded" (searches, re-plans)
    k_history: int = 2
    keep_first_observation: bool = False  # the episode's first observation stays in every prompt
    earlier_actions: bool = False  # the actions of the steps older than the last k_history, one line each
    think: bool = True
    num_workers: int = 8
    # Evaluation, checkpoints, logging.
    eval_every: int = 50
    eval_limit: int = 0  # 0: the whole eval split
    checkpoint_every: int = 10
    keep_checkpoints: int = 3
    seed: int = 42
    progress: bool = True
    resume_anyway: bool = False  # resume although run-only fields (RUN_ONLY_FIELDS) differ from the checkpoint's

    # ---- derived -------------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def validate(self) -> "ExperimentConfig":
        """Fail before any work starts, naming the field and the fix: types, choices, ranges, paths, data."""
        from gopd_jax.envs import env_splits, list_tasks
        from gopd_jax.envs.alfworld_env import EXPERTS as alfworld_experts

        def bad(field, msg):
            raise ValueError(f"config field {field!r}: {msg}")

        hints = typing.get_type_hints(ExperimentConfig)
        for field in dataclasses.fields(self):
            value, kind = getattr(self, field.name), hints[field.name]
            ok = (isinstance(value, bool) if kind is bool else
                  isinstance(value, int) and not isinstance(value, bool) if kind is int else
                  isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                  if kind is float else isinstance(value, kind))
            if not ok:
                bad(field.name, f"expected a{' finite' if kind is float else ''} {kind.__name__}, got {value!r}")
        for field, choices in _choices().items():
            if getattr(self, field) not in choices:
                noun = "environment" if field == "env" else field.replace("_", " ")
                bad(field, f"unknown {noun} {getattr(self, field)!r}; choose one of {', '.join(choices)}")
        for field, (rule, holds) in _RANGES.items():
            if not holds(getattr(self, field)):
                bad(field, f"must be {rule}, got {getattr(self, field)!r}")
        experts = alfworld_experts if self.env == "alfworld" else ("walkthrough",)
        if self.expert not in experts:
            bad("expert", f"{self.expert!r} is not a {self.env} expert; it has {' and '.join(map(repr, experts))}")
        if self.estimator == "sampled" and not self.allow_biased_sampling:
            for field, neutral in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0)):
                if getattr(self, field) != neutral:
                    bad(field, f"{getattr(self, field)!r} makes the sampled estimator biased: its p_S_old comes from "
                               "the tempered / truncated sampling distribution while the ratio and the teacher's "
                               f"log-probs use the untempered models; use {neutral!r}, --estimator exact, or "
                               "--allow-biased-sampling true to train this way anyway")
        for field in ("train_split", "eval_split"):
            if getattr(self, field) not in env_splits(self.env):
                bad(field, f"{getattr(self, field)!r} is not a {self.env} split; choose one of "
                           f"{', '.join(env_splits(self.env))}")
        for field in ("student", "teacher"):
            path = getattr(self, field)
            if not path:
                bad(field, f"set --{field} to a Hugging Face checkpoint directory")
            if not (Path(path) / "config.json").is_file():
                bad(field, f"{path!r} is not a checkpoint directory (no config.json); pass the directory that holds "
                           "config.json and the safetensors files")
        tok = self.tokenizer or self.student
        if not any((Path(tok) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            bad("tokenizer", f"no tokenizer files in {tok!r}; pass --tokenizer DIR")
        for split in dict.fromkeys((self.train_split, self.eval_split)):
            try:
                n = len(list_tasks(self.env, split, data_dir=self.data_dir or None))
            except (OSError, ValueError) as e:
                bad("data_dir", str(e))
            if n == 0:
                bad("data_dir", f"the {self.env} {split!r} split has no tasks; check --data-dir / the environment's data")
        return self


# Allowed values of the enum fields (imports deferred: jax and the env registry load only when validating).
def _choices() -> dict[str, tuple[str, ...]]:
    from gopd_jax.device_plan import STUDENT_UPDATES, TEACHER_LAYOUTS
    from gopd_jax.envs import ENV_NAMES
    from gopd_jax.losses import KL_VARIANTS
    from gopd_jax.methods import method_names

    return {"method": tuple(method_names()), "curriculum": CURRICULA, "env": ENV_NAMES, "estimator": ESTIMATORS,
            "kl_variant": tuple(KL_VARIANTS), "aggregation": AGGREGATIONS, "compute_dtype": COMPUTE_DTYPES,
            "teacher_layout": TEACHER_LAYOUTS, "student_update": STUDENT_UPDATES}


def _at_least(low):
    return f">= {low}", lambda v: v >= low


# field -> (rule in words, predicate). A new numeric field gets one line here.
_RANGES = {
    "rho": ("in (0, 1]", lambda v: 0 < v <= 1),
    "beta": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "clip_eps": ("in (0, 1)", lambda v: 0 < v < 1),
    "learning_rate": ("> 0", lambda v: v > 0),
    "weight_decay": _at_least(0),
    "clip_norm": ("> 0", lambda v: v > 0),
    "temperature": _at_least(0),  # 0: greedy
    "top_p": ("in (0, 1]", lambda v: 0 < v <= 1),
    "eval_temperature": _at_least(0),
    **{f: _at_least(1) for f in ("steps", "batch_tasks", "micro_batch_rows", "max_new_tokens", "max_prompt_tokens",
                                 "num_workers", "checkpoint_every", "keep_checkpoints", "ppo_epochs", "mini_batches")},
    **{f: _at_least(0) for f in ("max_turns", "top_k", "k_history", "eval_every", "eval_limit", "seed")},
}


# Fields that change how a run is executed or logged, not what it computes: --resume-anyway accepts a change.
RUN_ONLY_FIELDS = ("num_workers", "eval_every", "checkpoint_every", "keep_checkpoints", "teacher_layout",
                   "student_update")
# Labels and display switches, never part of the experiment: a run started with progress bars resumes without them.
_NOT_COMPARED = ("name", "out_dir", "resume_anyway", "progress")


# What a checkpoint's evaluation (runner.evaluate_checkpoint) depends on, besides the checkpoint itself.
EVAL_FIELDS = ("student", "env", "eval_split", "eval_limit", "eval_temperature", "max_turns", "max_new_tokens",
               "max_prompt_tokens", "k_history", "keep_first_observation", "earlier_actions", "think", "tokenizer",
               "data_dir", "compute_dtype", "seed")


def config_diff(saved: dict | str, cfg: ExperimentConfig, fields=None) -> dict[str, tuple]:
    """field -> (saved value, cfg's value) for every compared field (default: all but labels) that differs.
    A field the saved config lacks (added to ExperimentConfig later) counts as its default."""
    saved = json.loads(saved) if isinstance(saved, str) else saved
    defaults = dataclasses.asdict(ExperimentConfig())
    return {k: (saved.get(k, defaults[k]), v) for k, v in dataclasses.asdict(cfg).items()
            if (k in fields if fields else k not in _NOT_COMPARED) and saved.get(k, defaults[k]) != v}


def check_resume(saved_config: dict | str | None, cfg: ExperimentConfig, allow_fields=RUN_ONLY_FIELDS,
                 where: str = "the output directory") -> dict[str, tuple]:
    """Refuse (ValueError listing the differing fields and the ways out) to continue or reuse the run made
    with `saved_config` under `cfg`, unless they are the same experiment. Differences in `allow_fields` are
    accepted when cfg.resume_anyway; they are returned."""
    if saved_config is None:
        if cfg.resume_anyway:
            return {}
        raise ValueError(f"{where} holds a run whose config was not saved, so it cannot be checked against this one: "
                         "use a new --out-dir, or --resume-anyway to continue it unchecked")
    diff = config_diff(saved_config, cfg)
    blocking = [k for k in diff if not (cfg.resume_anyway and k in allow_fields)]
    if not blocking:
        return diff
    lines = "\n".join(f"  {k}: {old!r} there, {new!r} now" for k, (old, new) in diff.items())
    if all(k in allow_fields for k in diff):
        way = "or pass --resume-anyway to continue it (these fields do not change the experiment)"
    else:
        way = f"--resume-anyway accepts differences only in {', '.join(allow_fields)}"
    raise ValueError(f"{where} belongs to a different experiment; its config differs in:\n{lines}\n"
                     f"Use a new --out-dir for this experiment; {way}.")


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_args(parser: argparse.ArgumentParser, defaults: ExperimentConfig) -> None:
    """One --flag per config field, defaulting to `defaults`."""
    hints = typing.get_type_hints(ExperimentConfig)
    for field in dataclasses.fields(ExperimentConfig):
        kind = hints[field.name]
        flag = dict(type=parse_bool, nargs="?", const=True) if kind is bool else dict(type=kind)  # --x == --x true
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, **flag,
                            default=getattr(defaults, field.name), help=f"(default: {getattr(defaults, field.name)!r})")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    names = {f.name for f in dataclasses.fields(ExperimentConfig)}
    return ExperimentConfig(**{k: v for k, v in vars(args).items() if k in names})


def save_config(config: ExperimentConfig, out_dir: str | os.PathLike) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "config.json").write_text(config.to_json())
