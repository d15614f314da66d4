"""Writing one benchmark's section of the shared BENCHMARKS.md (the others stay untouched), and
the pieces every section's header shares: the command as run and the date."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def command_line() -> str:
    """The command that produced a section, as a reader would re-run it from the repo root."""
    module = Path(sys.argv[0]).stem
    return " ".join(["python", "-m", f"benchmarks.{module}", *sys.argv[1:]])


def header(heading: str, load: float, machine: str) -> list[str]:
    """A section's first lines: heading, the command as run, the date, and the machine (core
    count, the load average at start, then ``machine``)."""
    return [
        heading,
        "",
        f"Command: `{command_line()}`  ",
        f"Date: {date_utc()}  ",
        f"Machine: {os.cpu_count()} CPU cores shared with other jobs (load average "
        f"{load:.1f} at start), {machine}",
    ]


def interleaved_header(heading: str, loads, args, cfg, timing: str, batch_note: str) -> list[str]:
    """The header of a section timing variants of ``args.preset`` (with ``args.sets``) in
    ``args.repeats`` interleaved rounds of ``args.steps`` steps: heading, command, date, the
    machine (``loads``: ``os.getloadavg()`` at start and end; ``timing`` continues that line: how
    the steps were timed) and the preset's batch (``batch_note`` continues that line)."""
    import jax

    (a1, a5, a15), (b1, b5, b15) = loads
    sets = " " + " ".join(args.sets) if args.sets else ""
    tokens = cfg.train.batch_size * cfg.train.seq_len
    return [
        heading,
        "",
        f"Command: `{command_line()}`  ",
        f"Date: {date_utc()}  ",
        f"Machine: {os.cpu_count()} CPU cores shared with other jobs; load average (1, 5, 15 "
        f"min) {a1:.1f} / {a5:.1f} / {a15:.1f} at start, {b1:.1f} / {b5:.1f} / {b15:.1f} at the "
        f"end; jax {jax.__version__}. {args.repeats} interleaved rounds of {args.steps} steps "
        f"per variant{timing}",
        "",
        f"Preset `{args.preset}`{sets}: batch {cfg.train.batch_size} x {cfg.train.seq_len} = "
        f"{tokens:,} tokens per step. {batch_note}",
    ]


def date_utc() -> str:
    return subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()


def update_markdown(path: Path, heading: str, section: str) -> None:
    """Replace (or append) only the section under ``heading`` (a ``## ...`` line)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    path.write_text(text.rstrip("\n") + "\n", encoding="utf-8")


def publish(heading: str, section: str | list[str], update: Path | None) -> None:
    """Print a section (text or lines) and, with ``--update FILE``, write it into FILE."""
    text = section if isinstance(section, str) else "\n".join(section)
    print(text)
    if update:
        update_markdown(update, heading, text)
