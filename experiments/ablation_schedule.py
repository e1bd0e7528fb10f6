"""Curriculum ablation (paper: fixed-beta schedules trail the cosine curriculum): cosine, linear and constant
schedules, fixed beta values, a rho sweep, and vanilla OPD as the beta = 0 reference.

    python -m experiments.ablation_schedule --student DIR --teacher DIR [--env alfworld] [any runner flag]
"""

from experiments.grid import parse_base, run_variants
from gopd_jax.experiment import ExperimentConfig

VARIANTS = {
    "cosine_rho0.8": dict(method="guided_opd", curriculum="cosine", rho=0.8),
    "linear_rho0.8": dict(method="guided_opd", curriculum="linear", rho=0.8),
    "fixed_beta0.25": dict(method="fixed_beta", beta=0.25),
    "fixed_beta0.5": dict(method="fixed_beta", beta=0.5),
    "cosine_rho0.5": dict(method="guided_opd", curriculum="cosine", rho=0.5),
    "cosine_rho1.0": dict(method="guided_opd", curriculum="cosine", rho=1.0),
    "opd": dict(method="opd"),
}


def main(argv=None):
    base, _ = parse_base(__doc__, ExperimentConfig(name="ablation_schedule", out_dir="runs/ablation_schedule"), argv)
    run_variants(base, VARIANTS, f"Curriculum ablation ({base.env})")


if __name__ == "__main__":
    main()
