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


def interleaved_header(
    heading: str, load0, load1, repeats: int, steps: int, rest: str
) -> list[str]:
    """The header of a section timing variants in interleaved rounds: heading, command, date and
    the machine (load averages at start and end as ``os.getloadavg()`` gives them, jax version,
    rounds and steps); ``rest`` continues the machine line (how the steps were timed)."""
    import jax

    return [
        heading,
        "",
        f"Command: `{command_line()}`  ",
        f"Date: {date_utc()}  ",
        f"Machine: {os.cpu_count()} CPU cores shared with other jobs; load average (1, 5, 15 "
        f"min) {load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f} at start, {load1[0]:.1f} / "
        f"{load1[1]:.1f} / {load1[2]:.1f} at the end; jax {jax.__version__}. "
        f"{repeats} interleaved rounds of {steps} steps per variant{rest}",
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
