"""Subcommands of the engram-jax CLI, one module each (see engram_jax.cli)."""

import argparse


def add_command(sub, name: str, help: str, doc: str) -> argparse.ArgumentParser:
    """A subcommand's parser whose ``--help`` prints the module docstring ``doc`` as written
    (its layout kept: examples, lists)."""
    return sub.add_parser(
        name, help=help, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_set_arg(p, example: str = "train.steps=100") -> None:
    """The repeatable ``--set KEY=VALUE`` config override every config-taking command has."""
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config field, e.g. --set {example}; values are JSON or Python literals",
    )
