"""Text corpora for the input pipeline: where documents come from and how they split.

Sources (``DataConfig.path``):

- ``""``: the embedded default corpus, the ``*.py`` files of the running interpreter's standard
  library (test, site-packages and cache directories skipped), sorted, capped by
  ``max_files`` / ``max_bytes``; :func:`write_manifest` records the file list and hashes.
- a ``.jsonl`` file: one document per line, text under ``DataConfig.text_field``.
- any other file: plain text; documents are separated by blank lines, and a block longer than
  ``LINES_PER_DOCUMENT`` lines (e.g. a file with one sentence or verse per line and no blank
  lines) is cut into documents of that many lines; a block still longer than
  ``CHARS_PER_DOCUMENT`` characters (a text on one line) is cut there, at a space where one
  falls in the block's second half.
- a directory: every non-hidden file below it in sorted order, one document per file
  (``.jsonl`` files as above; a directory holding a single file splits it as above); files
  containing NUL bytes are skipped as binary.

Bytes that are not UTF-8 are replaced (U+FFFD) and the documents affected are counted.
The train/validation split is by document: a document is validation when the SHA-256 of its key
(relative path, ``file#block`` or ``file:line``) falls below ``val_fraction``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engram_jax.config import DataConfig

LINES_PER_DOCUMENT = 64
CHARS_PER_DOCUMENT = 16_384
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Document:
    key: str  # stable identity: relative path, "file#block" or "file:line"
    text: str
    non_utf8: bool = False  # some bytes were replaced by U+FFFD


@dataclass(frozen=True)
class SourceStats:
    """What reading a source found: the counts written to the data manifest."""

    files: int
    bytes: int
    documents: int
    non_utf8_documents: int
    non_utf8_files: int
    skipped_binary_files: int
    empty_documents: int


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read data file {path}: {e.strerror or e}") from None


def _decode(data: bytes) -> tuple[str, bool]:
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def default_corpus_files(max_files: int = 0, max_bytes: int = 0) -> tuple[Path, list[Path]]:
    """The stdlib ``*.py`` files used as the default corpus: ``(root, sorted files)``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"Python standard library not found at {root}")
    files, total = [], 0
    for path in _walk(root, suffix=".py"):
        size = path.stat().st_size
        if max_bytes and total + size > max_bytes:
            break
        files.append(path)
        total += size
        if max_files and len(files) >= max_files:
            break
    if not files:
        raise ValueError(f"no *.py files found under {root} (max_bytes={max_bytes})")
    return root, files


def _walk(root: Path, suffix: str = "") -> Iterator[Path]:
    """Regular non-hidden files below ``root`` in sorted relative-path order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.endswith(suffix):
                path = Path(dirpath) / name
                if path.is_file():
                    yield path


def write_manifest(path: Path, root: Path, files: list[Path]) -> dict:
    """Write ``{root, python, files: [{path, bytes, sha256}], sha256}`` for the default corpus."""
    entries = []
    for f in files:
        data = _read_bytes(f)
        entries.append(
            {
                "path": f.relative_to(root).as_posix(),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    digest = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
    manifest = {
        "root": str(root),
        "python": sys.version.split()[0],
        "files": entries,
        "total_bytes": sum(e["bytes"] for e in entries),
        "sha256": digest,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return manifest


def _jsonl_documents(path: Path, data: bytes, key: str, field: str) -> Iterator[Document]:
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        line, bad = _decode(raw)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or field not in record:
            fields = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(
                f"{path}:{lineno}: no text field {field!r} (found {fields}); set data.text_field"
            )
        text = record[field]
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: field {field!r} is not a string")  # noqa: TRY004
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from "\ud800"-style escapes
            text, bad = text.encode("utf-8", errors="replace").decode("utf-8"), True
        yield Document(f"{key}:{lineno}", text, bad)


def _file_documents(
    path: Path, data: bytes, key: str, cfg: DataConfig, *, split_blocks: bool
) -> Iterator[Document]:
    if path.suffix == ".jsonl":
        yield from _jsonl_documents(path, data, key, cfg.text_field)
        return
    text, bad = _decode(data)
    if not split_blocks:
        yield Document(key, text, bad)
        return
    blocks = []
    for para in text.replace("\r\n", "\n").split("\n\n"):
        lines = para.strip("\n").split("\n")
        for i in range(0, len(lines), LINES_PER_DOCUMENT):
            block = "\n".join(lines[i : i + LINES_PER_DOCUMENT])
            if block.strip():
                blocks.extend(cut(block, CHARS_PER_DOCUMENT))
    for i, block in enumerate(blocks):
        yield Document(f"{key}#{i}", block + "\n", bad and "\ufffd" in block)


def cut(text: str, max_chars: int) -> Iterator[str]:
    """``text`` in pieces of at most ``max_chars`` characters, in order, that join back to it;
    each cut is after the last space or line break in the piece's second half, if any."""
    while len(text) > max_chars:
        at = max(text.rfind(c, max_chars // 2, max_chars) for c in " \n")
        at = max_chars if at < 0 else at + 1  # the space ends the piece before it
        yield text[:at]
        text = text[at:]
    yield text


def iter_documents(
    cfg: DataConfig, files: list[Path] | None = None, root: Path | None = None
) -> tuple[list[Document], SourceStats]:
    """All non-empty documents of the configured source, in deterministic order, with stats.

    ``files``/``root``: the default-corpus file list (from :func:`default_corpus_files`).
    """
    if files is None:
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data path not found: {path}")
        if path.is_dir():  # a directory of one file is that file
            root, files = path, list(_walk(path))
            split = len(files) == 1
        else:
            root, files, split = path.parent, [path], True
    else:
        split = False
    docs, binary, empty, bad_files = [], 0, 0, 0
    for f in files:
        data = _read_bytes(f)
        if f.suffix != ".jsonl" and b"\x00" in data:
            binary += 1
            continue
        key = f.relative_to(root).as_posix()
        file_docs = list(_file_documents(f, data, key, cfg, split_blocks=split))
        bad_files += any(d.non_utf8 for d in file_docs)
        kept = [d for d in file_docs if d.text.strip()]
        empty += len(file_docs) - len(kept)
        docs.extend(kept)
    if not docs:
        raise ValueError(
            f"no non-empty documents in {cfg.path or root} ({len(files)} files, {binary} binary)"
        )
    stats = SourceStats(
        files=len(files),
        bytes=sum(f.stat().st_size for f in files),
        documents=len(docs),
        non_utf8_documents=sum(d.non_utf8 for d in docs),
        non_utf8_files=bad_files,
        skipped_binary_files=binary,
        empty_documents=empty,
    )
    return docs, stats


def _unit_hash(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def split_documents(
    docs: list[Document],
    val_fraction: float,
) -> tuple[list[Document], list[Document]]:
    """Deterministic train/validation split by document key; both sides non-empty."""
    if len(docs) < 2:
        raise ValueError(
            f"need at least 2 documents to split train/validation, got {len(docs)}: give a "
            f"text with more than {LINES_PER_DOCUMENT} lines, {CHARS_PER_DOCUMENT:,} "
            "characters or blank-line separated paragraphs"
        )
    u = [_unit_hash(d.key) for d in docs]
    is_val = [x < val_fraction for x in u]
    if not any(is_val):  # tiny corpora: the document with the smallest hash goes to validation
        is_val[min(range(len(docs)), key=u.__getitem__)] = True
    if all(is_val):
        is_val[max(range(len(docs)), key=u.__getitem__)] = False
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val


def fingerprint(docs: list[Document]) -> str:
    """SHA-256 over the documents' keys and texts (names cached tokenizers)."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.key.encode())
        h.update(hashlib.sha256(d.text.encode()).digest())
    return h.hexdigest()
