"""Every experiment module answers --help, and the config flags map onto ExperimentConfig fields."""

import importlib
from pathlib import Path

import pytest

from gopd_jax.experiment import ExperimentConfig

MODULES = sorted(p.stem for p in (Path(__file__).parents[1] / "experiments").glob("*.py")
                 if p.stem not in ("__init__", "grid"))  # every runnable module, so a new one cannot be missed


@pytest.mark.parametrize("name", MODULES)
def test_help(name, capsys):
    module = importlib.import_module(f"experiments.{name}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_flags_override_config():
    from experiments.grid import parse_base

    cfg, _ = parse_base("x", ExperimentConfig(), ["--steps", "7", "--think", "false", "--learning-rate", "3e-4",
                                                  "--method", "tcod_b2f"])
    assert (cfg.steps, cfg.think, cfg.learning_rate, cfg.method) == (7, False, 3e-4, "tcod_b2f")
