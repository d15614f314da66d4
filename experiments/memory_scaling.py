"""Memory scaling: a fixed backbone with Engram tables over 1.8 decades of slots; fit
loss = a + b log10(slots).

Command (37 min on the loaded 2-core CPU; results in results/memory_scaling/):

    engram-jax sweep slots --preset toy --steps 200 --slots 1e4,4e4,1.6e5,6.4e5 \\
        --out /tmp/engram-sweeps/memory_scaling

Expected at paper scale: validation loss linear in log(slots).
"""

from engram_jax.experiments.memory_scaling import (
    SLOTS,
    decades,
    fit_log_slots,
    slots_of,
    sweep,
    with_slots,
)

__all__ = ["SLOTS", "decades", "fit_log_slots", "slots_of", "sweep", "with_slots"]
