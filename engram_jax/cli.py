"""The ``engram-jax`` command: argument parsing only; each subcommand lives in its module.

A subcommand module exposes ``add_parser(subparsers)`` (which registers its parser and sets
``func``) and keeps heavy imports (jax, flax) inside the function it runs, so ``--help`` is fast.
Errors a user can fix (``ValueError``, ``FileNotFoundError``, ``UsageError``) print one line and
exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name of the module in engram_jax.commands for each subcommand, in help order
SUBCOMMANDS = ("demo", "params", "train", "eval", "sweep", "generate", "analyze", "compile")


class UsageError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engram-jax", description="Engram conditional memory in JAX / Flax NNX"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"engram_jax.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (
        UsageError,
        ValueError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
    ) as e:
        print(f"engram-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `engram-jax params ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
