"""KL-direction ablation (paper, average Score: default 37.94, roles swapped 33.32, both reverse 36.58):
student-owned tokens reverse KL + teacher-owned forward KL (default), the roles swapped, and both reverse.

    python -m experiments.ablation_kl --student DIR --teacher DIR [--env alfworld] [--estimator exact|sampled]
                                      [any runner flag]
"""

import textwrap

from experiments.grid import parse_base, run_variants
from gopd_jax.experiment import ExperimentConfig
from gopd_jax.losses import LossConfig

VARIANTS = {name: dict(method="guided_opd", kl_variant=name) for name in ("default", "swapped", "both_reverse")}

# What each estimator computes for the variants; printed in --help and written under the results table.
ESTIMATOR_NOTES = {
    "exact": "Estimator: exact (the default here). Every variant trains on the full-vocabulary KL in its direction "
             "on each owner's tokens (one more teacher pass per batch for its hidden states).",
    "sampled": "Estimator: sampled (--estimator sampled), from the sampled tokens only. Two of its per-owner losses "
               "are our approximations, not KL gradients: 'reverse on teacher tokens' (swapped, both_reverse) is "
               "the PPO surrogate on teacher-sampled tokens with no p_S/p_T importance weight, not the gradient of "
               "KL(p_S||p_T); 'forward on student tokens' (swapped) is importance-weighted cross-entropy with "
               f"weights p_T/p_S capped at {LossConfig().max_is_weight:g} (LossConfig.max_is_weight). The default "
               "variant's two losses are unbiased.",
}


def main(argv=None):
    description = "\n\n".join([__doc__.rstrip(), *(textwrap.fill(n, 110) for n in ESTIMATOR_NOTES.values())])
    base, _ = parse_base(description, ExperimentConfig(name="ablation_kl", out_dir="runs/ablation_kl",
                                                       estimator="exact"), argv)
    LossConfig(estimator=base.estimator)  # a bad --estimator fails before any run starts
    run_variants(base, VARIANTS, f"KL-direction ablation ({base.env})", notes=ESTIMATOR_NOTES[base.estimator])


if __name__ == "__main__":
    main()
