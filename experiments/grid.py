"""Shared driver of the paper-table modules: a base config from the command line, a set of named variants,
one runner call each (finished variants of the same config are skipped, so a grid resumes; a variant directory
holding another experiment is refused before anything runs), and a markdown table of results."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from gopd_jax.experiment import ExperimentConfig, add_config_args, config_from_args
from gopd_jax.reporting import finished_run, markdown_table
from gopd_jax.runner import run_experiment


def parse_base(description: str, defaults: ExperimentConfig, argv=None, extra=None) -> tuple[ExperimentConfig, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if extra:
        extra(ap)
    add_config_args(ap, defaults)
    args = ap.parse_args(argv)
    return config_from_args(args), args


def run_variants(base: ExperimentConfig, variants: dict[str, dict], title: str, notes: str = "") -> str:
    """Run `base` with each variant's field overrides under base.out_dir/<variant>; returns the table (with
    `notes` below it)."""
    root = Path(base.out_dir)
    configs = {name: dataclasses.replace(base, name=f"{base.name}/{name}", out_dir=str(root / name), **over)
               for name, over in variants.items()}
    for cfg in configs.values():  # every variant fails before the first one starts
        cfg.validate()
        finished_run(cfg)  # refuses a variant directory that holds another experiment
    # A finished variant (same config) is a no-op that says so: the grid resumes where it stopped.
    results = {name: run_experiment(cfg) for name, cfg in configs.items()}
    table = results_table(results, title) + (f"\n{notes}\n" if notes else "")
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.md").write_text(table)
    print(table)
    return table


def results_table(results: dict[str, dict], title: str) -> str:
    return f"# {title}\n\n" + markdown_table(
        ["variant", "Score", "Success Rate (%)", "Rounds", "n"],
        [[name, f"{r['score']:.2f}", f"{r['success_rate']:.2f}", f"{r['rounds']:.2f}", r["n"]]
         for name, r in results.items()]) + "\n"
