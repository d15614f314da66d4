"""The studies of ENGRAM_SPEC sections 6-7, one file each; the code lives in the installed
package (:mod:`engram_jax.experiments`, runner :mod:`engram_jax.sweep`) so that the
``engram-jax sweep`` command can import it. These files re-export the pure config functions
and give the commands; ``README.md`` has the commands that produced ``results/``."""
