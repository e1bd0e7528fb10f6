"""KL-direction ablation (paper, average Score: default 37.94, roles swapped 33.32, both reverse 36.58):
student-owned tokens reverse KL + teacher-owned forward KL (default), the roles swapped, and both reverse.

    python -m experiments.ablation_kl --student DIR --teacher DIR [--env alfworld] [any runner flag]
"""

from experiments.grid import parse_base, run_variants
from gopd_jax.experiment import ExperimentConfig

VARIANTS = {name: dict(method="guided_opd", kl_variant=name) for name in ("default", "swapped", "both_reverse")}


def main(argv=None):
    base, _ = parse_base(__doc__, ExperimentConfig(name="ablation_kl", out_dir="runs/ablation_kl"), argv)
    run_variants(base, VARIANTS, f"KL-direction ablation ({base.env})")


if __name__ == "__main__":
    main()
