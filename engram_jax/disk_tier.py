"""Engram tables on local disk: a row store larger than memory (ENGRAM_SPEC section 8, SSD tier).

A table store is a directory holding, per Engram layer, one tensorstore zarr3 array of the
layer's reachable rows ``[n_rows, d]``, chunked by rows: shards of ``shard_rows`` rows (one file
each) made of inner chunks of ``chunk_rows`` rows (4 KiB at 64 rows of 16 floats), so a row read
touches one small byte range, not the table. ``manifest.json`` records the shapes, the dtype,
every file's size and the hashing config (the engram config fields that decide which row a
token's n-gram reads, plus the compressed vocabulary size); :func:`open_store` checks all of
them, so a store written for another model, or a truncated copy, is refused in one line
instead of serving wrong rows.

Writes are atomic: everything goes to ``PATH.tmp-<pid>`` and is renamed into place only when
complete (an existing store is swapped out and removed afterwards), so a full disk, a crash or
Ctrl-C leaves any existing store untouched and no half-written one behind.

:class:`~engram_jax.disk_rows.DiskRows` (its own module: the row reader) serves
``take(ids_N) -> rows [N, d]`` like the host stores of ``engram_jax.offload``, behind the same
hot-row cache (``HostRows``), and adds ``prefetch(ids)``: the reads start on a thread pool and
the call returns at once; a later ``take`` collects them. ``Generator`` prefetches the next
prompt chunk's rows while the current chunk runs, and a decode step's rows as soon as its token
is sampled.

Shape legend: R rows of a layer's table, d row width, N ids, U unique ids.
"""

from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np

from engram_jax.disk_rows import DiskRows as DiskRows  # re-exported: the public path

MANIFEST = "manifest.json"
FORMAT = "engram-jax table store 1"


class StoreError(ValueError):
    """A table store that cannot be used or written; the message is one line."""


def hashing_signature(engram_cfg, num_compressed: int) -> dict:
    """The fields that decide which table row each n-gram reads (ENGRAM_SPEC section 2)."""
    e = engram_cfg
    return {
        "engram_vocab_size": list(e.engram_vocab_size),
        "max_ngram_size": e.max_ngram_size,
        "n_head_per_ngram": e.n_head_per_ngram,
        "n_embed_per_ngram": e.n_embed_per_ngram,
        "seed": e.seed,
        "pad_id": e.pad_id,
        "layer_ids": list(e.layer_ids),
        "compress_tokenizer": e.compress_tokenizer,
        "compressed_vocab": int(num_compressed),
    }


def model_shapes(model) -> dict:
    """``{layer: (reachable rows, d)}``: what a store for ``model`` must hold (padding rows,
    which hashed ids never reach, are not stored). Needs no table values."""
    d = model.cfg.engram.d_head
    return {i: (model.blocks[i].engram.table.n_rows, d) for i in model.engram_layers}


def model_tables(model) -> dict:
    """``{layer: reachable rows [R, d]}`` of a model's resident tables (NumPy)."""
    out = {}
    for i in model.engram_layers:
        table = model.blocks[i].engram.table
        out[i] = np.asarray(table.table[...])[: table.n_rows]
    return out


def default_store_path(workdir: str, step: int) -> str:
    """Where ``engram-jax generate --offload disk`` keeps a run's store: ``W/table_store/<step>``
    (beside ``W/checkpoints``, not inside it, so checkpoint managers never see it). A store is
    read with random accesses: a remote workdir needs an explicit local ``--table-store``."""
    if "://" in str(workdir):
        raise StoreError(f"workdir {workdir} is remote: pass --table-store with a local path")
    return os.path.join(workdir, "table_store", str(int(step)))


# ---------------------------------------------------------------------------------------------
# Writing


def _array_spec(path: str, shape, shard_rows: int, chunk_rows: int) -> dict:
    r, d = (int(s) for s in shape)
    shard_rows = max(1, min(shard_rows, r))
    chunk_rows = max(1, min(chunk_rows, shard_rows))
    shard_rows -= shard_rows % chunk_rows  # shards are whole inner chunks
    sharding = {
        "chunk_shape": [chunk_rows, d],
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        "index_codecs": [
            {"name": "bytes", "configuration": {"endian": "little"}},
            {"name": "crc32c"},
        ],
        "index_location": "end",
    }
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": path},
        "metadata": {
            "shape": [r, d],
            "data_type": "float32",
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard_rows, d]}},
            "codecs": [{"name": "sharding_indexed", "configuration": sharding}],
        },
        "create": True,
        "delete_existing": True,
    }


def _write_block(array, start: int, rows_KxD: np.ndarray) -> None:
    """One block of whole shards (a separate function: tests make it fail like a full disk)."""
    array[start : start + len(rows_KxD)].write(rows_KxD).result()


def _rows_of(source, start: int, stop: int) -> np.ndarray:
    if callable(source):
        return np.asarray(source(start, stop), np.float32)
    return np.asarray(source[start:stop], np.float32)


def _files(root: str) -> dict:
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            full = os.path.join(folder, name)
            out[os.path.relpath(full, root)] = os.path.getsize(full)
    return out


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    full = getattr(exc, "errno", None) == errno.ENOSPC or "no space left" in str(exc).lower()
    return "the disk is full (No space left on device)" if full else text


def write_store(
    path: str,
    tables: dict,
    shapes: dict,
    signature: dict,
    *,
    shard_rows: int = 1 << 20,
    chunk_rows: int = 64,
    overwrite: bool = False,
    check_space: bool = True,
    progress=None,
) -> str:
    """Write ``tables`` (``{layer: array [R, d] or callable(start, stop) -> rows}``; ``shapes``
    ``{layer: (R, d)}``) as a store at ``path``, atomically. -> ``path``."""
    import tensorstore as ts

    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise StoreError(f"table store {path} already exists (pass overwrite=True to replace it)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if check_space:
        _check_space(path, shapes)
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for layer, shape in sorted(shapes.items()):
            spec = _array_spec(os.path.join(tmp, f"layer_{layer}"), shape, shard_rows, chunk_rows)
            _write_layer(ts.open(spec).result(), spec, layer, tables[layer], progress)
        _write_manifest(tmp, signature, shapes)
        _swap_in(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, StoreError):
            raise
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt: the temp store is gone, the old one untouched
        raise StoreError(
            f"writing table store {path} failed: {_reason(exc)}; nothing was replaced"
        ) from exc
    return path


def _check_space(path: str, shapes: dict) -> None:
    need = sum(4 * r * d for r, d in shapes.values())
    free = shutil.disk_usage(os.path.dirname(path)).free
    if need * 1.01 + (64 << 20) > free:
        raise StoreError(
            f"table store {path} needs {need / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free "
            "there: free space or pass another --table-store"
        )


def _write_layer(array, spec: dict, layer: int, source, progress) -> None:
    """One layer's rows, a block of whole shards at a time."""
    r, d = spec["metadata"]["shape"]
    block = spec["metadata"]["chunk_grid"]["configuration"]["chunk_shape"][0]
    for start in range(0, r, block):
        rows = _rows_of(source, start, min(r, start + block))
        if rows.shape != (min(r, start + block) - start, d):
            raise StoreError(f"layer {layer} rows {start}.. have shape {rows.shape}")
        _write_block(array, start, rows)
        if progress is not None:
            progress(4 * rows.size)


def _write_manifest(tmp: str, signature: dict, shapes: dict) -> None:
    """The manifest, written last (after every row file, whose sizes it records) and synced."""
    manifest = {
        "format": FORMAT,
        "dtype": "float32",
        "signature": signature,
        "layers": {str(i): {"shape": list(s)} for i, s in sorted(shapes.items())},
        "files": _files(tmp),
    }
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _swap_in(tmp: str, path: str) -> None:
    """Rename the finished ``tmp`` to ``path``; an existing store moves aside first and is
    deleted only once the new one is in place."""
    old = None
    if os.path.exists(path):
        old = f"{path}.old-{os.getpid()}"
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Reading


def read_manifest(path: str) -> dict:
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        what = "has no manifest.json (incomplete or not a table store)"
        raise StoreError(f"table store {path} {what if os.path.isdir(path) else 'does not exist'}")
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise StoreError(f"table store {path}: unreadable manifest.json ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise StoreError(f"table store {path}: format {manifest.get('format')!r}, not {FORMAT!r}")
    return manifest


def check_store(path: str, signature: dict, shapes: dict) -> dict:
    """Refuse a store that is truncated or was written for another model: -> its manifest."""
    manifest = read_manifest(path)
    for rel, size in manifest["files"].items():
        full = os.path.join(path, rel)
        have = os.path.getsize(full) if os.path.isfile(full) else None
        if have != size:
            state = "is missing" if have is None else f"has {have:,} bytes, not {size:,}"
            raise StoreError(f"table store {path} is truncated: {rel} {state}")
    diff = [
        f"{k}: store {manifest['signature'].get(k)!r} vs model {v!r}"
        for k, v in signature.items()
        if manifest["signature"].get(k) != v
    ]
    if diff:
        raise StoreError(
            f"table store {path} was written for another hashing config ({'; '.join(diff)}): "
            "delete it or pass the store of this model"
        )
    stored = {int(k): tuple(v["shape"]) for k, v in manifest["layers"].items()}
    want = {int(k): tuple(v) for k, v in shapes.items()}
    if stored != want:
        raise StoreError(
            f"table store {path} holds tables {stored}, the model needs {want} (layer: rows, width)"
        )
    return manifest


def open_store(path: str, signature: dict, shapes: dict, **kw) -> dict:
    """``{layer: DiskRows}`` of a checked store (see :func:`check_store`)."""
    manifest = check_store(path, signature, shapes)
    return {int(k): DiskRows(path, int(k), **kw) for k in manifest["layers"]}


def fresh_rows(d: int, seed: int, std: float | None = None):
    """A callable ``(start, stop) -> rows`` of a random-normal table (std ``d**-0.5`` like
    ``MultiHeadTable``), reproducible block by block: writes a table larger than RAM."""
    std = d**-0.5 if std is None else std

    def rows(start: int, stop: int) -> np.ndarray:
        rng = np.random.default_rng([seed, start])
        return rng.standard_normal((stop - start, d), np.float32) * np.float32(std)

    return rows


def disk_host_rows(
    model,
    compression,
    path: str,
    *,
    source: str,
    cache_rows: int = 65536,
    write_missing: bool = False,
    release: bool = True,
    log=None,
):
    """``HostRows`` over the store at ``path`` for ``model`` (a row source for ``Generator``),
    behind a device cache of ``cache_rows`` rows per layer. ``source`` names where the rows come
    from (e.g. ``"checkpoint step 300"``) and is checked like the hashing config, so a store of
    another checkpoint is refused. ``write_missing``: write the store from the model's tables
    when ``path`` does not exist yet. ``release``: then drop the model's device tables."""
    from engram_jax.offload import HostRows

    signature = dict(hashing_signature(model.cfg.engram, compression.num_compressed))
    signature["source"] = source
    shapes = model_shapes(model)
    if write_missing and not os.path.exists(path):
        if log is not None:
            log(f"writing the Engram table store {path} ({source}) ...")
        write_store(path, model_tables(model), shapes, signature)
    stores = open_store(path, signature, shapes)
    if release:
        import jax.numpy as jnp

        for i in model.engram_layers:
            var = model.blocks[i].engram.table.table
            var.set_value(jnp.zeros((0, var[...].shape[1]), var[...].dtype))
    return HostRows(stores, hot_rows=int(cache_rows))
