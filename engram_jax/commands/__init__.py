"""Subcommands of the engram-jax CLI, one module each (see engram_jax.cli)."""


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
