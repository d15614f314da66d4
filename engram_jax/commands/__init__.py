"""Subcommands of the engram-jax CLI, one module each (see engram_jax.cli)."""
