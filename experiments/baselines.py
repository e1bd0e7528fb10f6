"""Baselines in the same runner: SFT on expert trajectories (ALFWorld walkthroughs / ScienceWorld gold paths),
TCOD's temporal curriculum in both orderings (f2b: the student plays the first k turns; b2f: the teacher's
prefix, then the student's last k turns; k growing to the turn limit; see gopd_jax.methods), vanilla OPD and
Guided-OPD.

    python -m experiments.baselines --student DIR --teacher DIR [--env alfworld] [any runner flag]
"""

from experiments.grid import parse_base, run_variants
from gopd_jax.experiment import ExperimentConfig

VARIANTS = {"sft": dict(method="sft"), "tcod_f2b": dict(method="tcod_f2b"), "tcod_b2f": dict(method="tcod_b2f"),
            "opd": dict(method="opd"), "guided_opd": dict(method="guided_opd")}


def main(argv=None):
    base, _ = parse_base(__doc__, ExperimentConfig(name="baselines", out_dir="runs/baselines"), argv)
    run_variants(base, VARIANTS, f"Baselines ({base.env})")


if __name__ == "__main__":
    main()
