"""Run-directory paths that may live on Cloud Storage: one abstraction, etils ``epath``.

Orbax and Grain already speak ``epath``; every file of a workdir (config, tokenizer, token
cache, ``metrics.jsonl``, TensorBoard events, summary, checkpoints) goes through :func:`as_path`,
so ``--workdir gs://bucket/run`` is the same bucket on every worker instead of a local
directory named ``gs:``. Supported: local paths and ``gs://`` (through fsspec's ``gcsfs``, or
TensorFlow's gfile when TensorFlow is installed). Anything else is refused with one line.

Files that a library can only read from a local path (SentencePiece models, memory-mapped
token streams) are copied to :func:`local_cache` first.
"""

from __future__ import annotations

import hashlib
import os
import pathlib

from etils import epath

SCHEMES = {"gs": "Google Cloud Storage"}


def scheme(path: str | os.PathLike) -> str:
    """``"gs"`` for ``gs://bucket/x``, ``""`` for a local path."""
    text = os.fspath(path)
    return text.split("://", 1)[0].lower() if "://" in text else ""


def as_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path`` (absolute when local); unsupported schemes are refused."""
    s = scheme(path)
    if s and s not in SCHEMES:
        raise ValueError(
            f"{os.fspath(path)}: {s}:// is not supported for a workdir; use a local path or "
            f"{', '.join(f'{k}://' for k in SCHEMES)}"
        )
    text = os.fspath(path)
    if s and not text.split("://", 1)[1].strip("/"):
        raise ValueError(f"{text}: give a bucket, e.g. {s}://my-bucket/run")
    return epath.Path(text) if s else epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_local(path: str | os.PathLike) -> bool:
    return scheme(path) == ""


def local_cache(path: str | os.PathLike) -> pathlib.Path:
    """A local directory standing for the remote ``path`` (``$ENGRAM_JAX_CACHE``, default
    ``~/.cache/engram-jax``); for a local path, the path itself."""
    if is_local(path):
        return pathlib.Path(as_path(path))
    root = os.environ.get("ENGRAM_JAX_CACHE") or os.path.join("~", ".cache", "engram-jax")
    key = hashlib.sha256(os.fspath(path).encode()).hexdigest()[:16]
    out = pathlib.Path(os.path.expanduser(root)) / key
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_bytes(path: epath.Path, data: bytes) -> None:
    """Write a whole file; on a local disk through a temporary file and a rename (a crash never
    leaves a truncated file); object stores replace objects atomically anyway."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not is_local(path):
        path.write_bytes(data)
        return
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_text(path: epath.Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def copy_missing(src: epath.Path, dst: epath.Path, *, skip=lambda name: ".tmp" in name) -> list:
    """Copy the files of directory ``src`` that ``dst`` lacks (not recursive); their names."""
    if not src.is_dir():
        return []
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in sorted(src.iterdir(), key=lambda p: p.name):
        if f.is_dir() or skip(f.name) or (dst / f.name).exists():
            continue
        write_bytes(dst / f.name, f.read_bytes())
        copied.append(f.name)
    return copied
