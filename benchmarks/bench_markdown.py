"""Writing one benchmark's section of the shared BENCHMARKS.md (the others stay untouched)."""

from __future__ import annotations

import re
from pathlib import Path


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
