"""One config object per experiment: defaults, command-line overrides, validation before any work starts."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from pathlib import Path

CURRICULA = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything one training run needs. Defaults are the paper's settings (DESIGN.md §3)."""

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
    aggregation: str = "token_mean"
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
    k_history: int = 2
    think: bool = True
    num_workers: int = 8
    # Evaluation, checkpoints, logging.
    eval_every: int = 50
    eval_limit: int = 0  # 0: the whole eval split
    checkpoint_every: int = 10
    keep_checkpoints: int = 3
    seed: int = 42
    progress: bool = True

    # ---- derived -------------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def validate(self) -> "ExperimentConfig":
        """Fail before any work starts, naming the field and the fix."""
        from gopd_jax.envs import ENV_NAMES, env_splits
        from gopd_jax.losses import KL_VARIANTS
        from gopd_jax.methods import method_names

        def bad(field, msg):
            raise ValueError(f"config field {field!r}: {msg}")

        if self.method not in method_names():
            bad("method", f"unknown method {self.method!r}; choose one of {', '.join(method_names())}")
        if self.curriculum not in CURRICULA:
            bad("curriculum", f"unknown curriculum {self.curriculum!r}; choose one of {', '.join(CURRICULA)}")
        if self.env not in ENV_NAMES:
            bad("env", f"unknown environment {self.env!r}; choose one of {', '.join(ENV_NAMES)}")
        for field in ("train_split", "eval_split"):
            if getattr(self, field) not in env_splits(self.env):
                bad(field, f"{getattr(self, field)!r} is not a {self.env} split; choose one of "
                           f"{', '.join(env_splits(self.env))}")
        if self.kl_variant not in KL_VARIANTS:
            bad("kl_variant", f"choose one of {', '.join(KL_VARIANTS)}")
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
        if not 0 <= self.beta <= 1:
            bad("beta", f"must be in [0, 1], got {self.beta}")
        for field in ("steps", "batch_tasks", "micro_batch_rows", "num_workers", "max_new_tokens", "ppo_epochs",
                      "mini_batches"):
            if getattr(self, field) < 1:
                bad(field, "must be >= 1")
        if self.estimator == "sampled" and not self.allow_biased_sampling:
            for field, neutral in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0)):
                if getattr(self, field) != neutral:
                    bad(field, f"{getattr(self, field)!r} makes the sampled estimator biased: its p_S_old comes from "
                               "the tempered / truncated sampling distribution while the ratio and the teacher's "
                               f"log-probs use the untempered models; use {neutral!r}, --estimator exact, or "
                               "--allow-biased-sampling true to train this way anyway")
        return self


def _parse_bool(text: str) -> bool:
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
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name,
                            type=_parse_bool if kind is bool else kind, default=getattr(defaults, field.name),
                            help=f"(default: {getattr(defaults, field.name)!r})")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    names = {f.name for f in dataclasses.fields(ExperimentConfig)}
    return ExperimentConfig(**{k: v for k, v in vars(args).items() if k in names})


def save_config(config: ExperimentConfig, out_dir: str | os.PathLike) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "config.json").write_text(config.to_json())
