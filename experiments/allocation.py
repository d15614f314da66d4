"""Sparsity allocation (the U-curve): iso-P_tot, iso-P_act configs over rho.

Command (toy scale, 10 runs of 6-20 min each on the loaded 2-core CPU; results in
results/rho_sweep/):

    engram-jax sweep rho --preset toy --seeds 2 --steps 200 --rhos 1,0.9,0.8,0.6,0.4 \\
        --out /tmp/engram-sweeps/rho_sweep

Expected at paper scale: a U-shape with the best rho ~0.75-0.8. See README.md for what the toy
run shows.
"""

from engram_jax.experiments.allocation import (
    RHOS,
    allocate,
    budget,
    check,
    pure_moe,
    sweep,
)

__all__ = ["RHOS", "allocate", "budget", "check", "pure_moe", "sweep"]
