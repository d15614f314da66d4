"""Ablations: the reference Engram vs no gating / no compression / no short conv / no
multi-branch / 4-grams at equal table budget / insertion depth, plus the MoE and OverEncoding
baselines.

Command (10 runs of 6-20 min each on the loaded 2-core CPU; results in results/ablations/;
without ``--only`` the sweep also moves the layer to block 3):

    engram-jax sweep ablate --preset toy --steps 200 --out /tmp/engram-sweeps/ablations \
        --only reference,no_gating,no_compression,no_short_conv,no_multi_branch,ngram4,\
layer0,layer2,moe,overencoding

Expected at paper scale: removing multi-branch fusion, gating or tokenizer compression hurts
most; removing the short conv hurts slightly; 4-grams are slightly worse; layer 2 (1-based) is
the best single insertion.
"""

from engram_jax.experiments.ablations import ngram4, sweep, variants

__all__ = ["ngram4", "sweep", "variants"]
