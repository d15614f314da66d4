"""Grain input pipeline: documents -> tokens -> packed windows -> Engram hash ids -> batches.

Letters: B global batch, b = B / process_count local rows, T = seq_len, H hash heads per layer.

1. Documents come from :mod:`engram_jax.corpus` and split train/validation by document.
2. Tokenizer: ``DataConfig.tokenizer`` if set, else a SentencePiece model trained on the
   training split and cached in ``workdir/data`` (named by vocab size and a corpus hash).
3. Packing: each split is one token stream (every document followed by EOS), cut into windows
   of T+1 tokens with stride T, so ``targets`` are ``inputs`` shifted by one and no token is lost.
   The streams are saved as ``.npy`` in ``workdir/data`` (named by tokenizer and document hashes,
   so a restart reuses them) and memory-mapped (workers share them).
4. Grain: ``MapDataset.range(windows).shuffle(seed).repeat().batch(B)`` (reshuffled each epoch,
   random access, so the iterator state is one index), then one map that cuts this process's
   rows ``[i*b, (i+1)*b)`` out of the global batch, gathers the windows, compresses the inputs
   and hashes them with :class:`NgramHasher`. The global batch never depends on process_count.
5. ``to_iter_dataset`` with a thread prefetch buffer, plus ``mp_prefetch`` workers if
   ``DataConfig.worker_count > 0`` (spawned: the caller needs a ``__main__`` guard).

A batch is ``{"inputs": int32[b, T], "targets": int32[b, T], "engram_ids": {layer_id:
int32[b, T, H]}}``; engram ids are per-head rows without the head offsets (the table adds them).
N-grams run across document boundaries (EOS included), as in the reference demo.

Checkpointing: ``it.get_state()`` / ``it.set_state(state)`` on the iterator from
:meth:`DataBundle.train_iter`; :class:`engram_jax.checkpoint.Checkpointer` saves and restores it
with the model.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grain
import numpy as np
import sentencepiece as spm

from engram_jax import corpus
from engram_jax.config import Config
from engram_jax.hashing import NgramHasher
from engram_jax.tokenizer import (
    EOS_ID,
    CompressionTable,
    build_compression,
    load_tokenizer,
    train_tokenizer,
)

_ENCODE_CHUNK_DOCS = 4096


class _Windows:
    """Windows of ``T+1`` tokens with stride ``T`` over a memory-mapped ``.npy`` token stream."""

    def __init__(self, path: Path, seq_len: int):
        self.path, self.seq_len = Path(path), seq_len
        self._tokens = None
        self.num_tokens = int(np.load(self.path, mmap_mode="r").shape[0])
        self.num_windows = max(0, (self.num_tokens - 1) // seq_len)

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.load(self.path, mmap_mode="r")
        return self._tokens

    def __getstate__(self):  # pickled to mp_prefetch workers: reopen the map there
        return {**self.__dict__, "_tokens": None}

    def gather(self, window_ids: np.ndarray) -> np.ndarray:
        starts = np.asarray(window_ids, np.int64) * self.seq_len
        return np.asarray(self.tokens[starts[:, None] + np.arange(self.seq_len + 1)], np.int32)


class _MakeBatch:
    """Global window ids ``[B]`` -> this process's batch dict (a Grain map, picklable)."""

    def __init__(
        self,
        windows: _Windows,
        lookup: np.ndarray,
        hasher: NgramHasher | None,
        process_index: int,
        local_batch: int,
    ):
        self.windows, self.lookup, self.hasher = windows, lookup, hasher
        self.lo, self.hi = process_index * local_batch, (process_index + 1) * local_batch

    def __call__(self, window_ids: np.ndarray) -> dict:
        tokens_bxt1 = self.windows.gather(np.asarray(window_ids)[self.lo : self.hi])
        inputs_bxt = np.ascontiguousarray(tokens_bxt1[:, :-1])
        engram_ids = {}
        if self.hasher is not None:
            engram_ids = self.hasher(self.lookup[inputs_bxt])
        return {
            "inputs": inputs_bxt,
            "targets": np.ascontiguousarray(tokens_bxt1[:, 1:]),
            "engram_ids": engram_ids,
        }


@dataclass
class DataBundle:
    """Everything the trainer needs from the data side."""

    tokenizer: spm.SentencePieceProcessor
    tokenizer_path: Path
    compression: CompressionTable
    hasher: NgramHasher | None
    train_dataset: grain.MapDataset  # infinite; element i is this process's i-th batch
    stats: dict
    prefetch: int = 2
    worker_count: int = 0
    _val: _MakeBatch | None = field(default=None, repr=False)
    _val_windows: int = 0
    _global_batch: int = 0

    def train_iter(self) -> grain.DatasetIterator:
        """A checkpointable iterator (``get_state``/``set_state``) over training batches."""
        read = grain.ReadOptions(
            num_threads=min(self.prefetch, 2), prefetch_buffer_size=self.prefetch
        )
        ds = self.train_dataset.to_iter_dataset(read)
        if self.worker_count:
            _mark_absl_flags_parsed()
            ds = ds.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self.worker_count, per_worker_buffer_size=max(1, self.prefetch)
                )
            )
            ds = ds.map(_copy_batch)  # workers hand out shared memory: own the arrays
        return iter(ds)

    def val_batches(self, num_batches: int) -> list[dict]:
        """Fixed validation batches: windows in order, wrapping around a short split."""
        ids = np.arange(num_batches * self._global_batch) % self._val_windows
        return [
            self._val(ids[i * self._global_batch : (i + 1) * self._global_batch])
            for i in range(num_batches)
        ]


def _copy_batch(batch: dict) -> dict:
    return {k: _copy_batch(v) if isinstance(v, dict) else np.array(v) for k, v in batch.items()}


def _mark_absl_flags_parsed() -> None:
    """Grain 0.2.18's mp_prefetch reads an absl flag and raises UnparsedFlagAccessError in
    programs that never parse absl flags (google/grain#1355, fixed upstream in #1362)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _tokenizer_for(
    cfg: Config, train_docs, data_dir: Path
) -> tuple[spm.SentencePieceProcessor, Path, bool]:
    vocab = cfg.model.vocab_size
    if cfg.data.tokenizer:
        path = Path(cfg.data.tokenizer).expanduser()
        sp, trained = load_tokenizer(path), False
    else:
        tag = corpus.fingerprint(train_docs)[:12]
        path = data_dir / f"tokenizer-{cfg.data.tokenizer_type}-{vocab}-{tag}.model"
        if path.is_file():
            sp, trained = load_tokenizer(path), False
        else:
            sp = train_tokenizer(
                (d.text for d in train_docs),
                path,
                vocab_size=vocab,
                model_type=cfg.data.tokenizer_type,
            )
            trained = True
    if sp.get_piece_size() != vocab:
        raise ValueError(
            f"tokenizer {path} has vocab size {sp.get_piece_size()} but "
            f"model.vocab_size={vocab}; they must match"
        )
    return sp, path, trained


def _line_mode(sp: spm.SentencePieceProcessor, sample: str) -> bool:
    """True if encoding line by line and joining with the "\n" piece equals encoding the whole
    text (so for tokenizers trained here, where "\n" is a user-defined symbol). It is faster:
    SentencePiece's cost grows with the length of each input string."""
    nl = sp.piece_to_id("\n")
    if nl == sp.unk_id() or sp.encode("\n") != [nl]:
        return False
    probe = "a  b\n\n\tc d\nx" + sample[:20000]
    return sp.encode(probe) == _join_lines(sp.encode(probe.split("\n")), nl, None)


def _join_lines(line_ids: list[list[int]], nl: int, end: int | None) -> list[int]:
    out = []
    for ids in line_ids[:-1]:
        out += ids
        out.append(nl)
    out += line_ids[-1]
    if end is not None:
        out.append(end)
    return out


def _encode_split(sp: spm.SentencePieceProcessor, docs, path: Path, line_mode: bool) -> None:
    """Tokenize documents (each followed by EOS) into one int32 ``.npy`` stream at ``path``."""
    parts, nl, threads = [], sp.piece_to_id("\n"), os.cpu_count() or 1
    for i in range(0, len(docs), _ENCODE_CHUNK_DOCS):
        texts = [d.text for d in docs[i : i + _ENCODE_CHUNK_DOCS]]
        if line_mode:
            lines = [t.split("\n") for t in texts]
            flat = sp.encode([line for doc in lines for line in doc], num_threads=threads)
            pos = 0
            for doc in lines:
                ids = _join_lines(flat[pos : pos + len(doc)], nl, EOS_ID)
                pos += len(doc)
                parts.append(np.asarray(ids, np.int32))
        else:
            parts += [
                np.asarray(ids + [EOS_ID], np.int32)
                for ids in sp.encode(texts, num_threads=threads)
            ]
    tokens = np.concatenate(parts)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
    np.save(tmp, tokens)
    os.replace(tmp, path)


def _token_streams(sp, tok_path: Path, splits: dict, data_dir: Path, seq_len: int):
    """Encode each split once per (tokenizer, documents) pair; later runs reuse the ``.npy``."""
    tok_hash = hashlib.sha256(Path(tok_path).read_bytes()).hexdigest()
    line_mode = None
    windows, n_tokens = {}, {}
    for name, docs in splits.items():
        key = hashlib.sha256((tok_hash + corpus.fingerprint(docs)).encode()).hexdigest()[:12]
        path = data_dir / f"tokens-{name}-{key}.npy"
        if not path.is_file():
            if line_mode is None:
                line_mode = _line_mode(sp, splits["train"][0].text)
            _encode_split(sp, docs, path, line_mode)
        windows[name] = _Windows(path, seq_len)
        n_tokens[name] = windows[name].num_tokens
    return windows, n_tokens


def synthetic_batch(cfg: Config, seed: int = 0) -> dict:
    """A global batch of random tokens with their Engram hash ids (no vocabulary compression):
    a real batch's shapes and dtypes, to compile, test or time the step without a corpus."""
    from engram_jax.tokenizer import identity_compression

    rng = np.random.default_rng(seed)
    B, T, V = cfg.train.batch_size, cfg.train.seq_len, cfg.model.vocab_size
    tokens = rng.integers(0, V, (B, T + 1), dtype=np.int32)
    inputs = tokens[:, :-1]
    ids = {}
    if cfg.engram.enabled:
        ids = identity_compression(V).hasher(cfg.engram, out_dtype=np.int32)(inputs)
    return dict(inputs=inputs, targets=tokens[:, 1:], engram_ids=ids)


def _read_corpus(cfg: Config, data_dir: Path) -> tuple[list, list, dict]:
    """The corpus's training and validation documents, and its stats: the source (for the
    default corpus, the manifest of the files read) and the reader's counts."""
    source: dict = {"path": cfg.data.path or "<python stdlib>"}
    if cfg.data.path:
        docs, src_stats = corpus.iter_documents(cfg.data)
    else:
        root, files = corpus.default_corpus_files(cfg.data.max_files, cfg.data.max_bytes)
        manifest = corpus.write_manifest(data_dir / "corpus_manifest.json", root, files)
        source.update(
            root=str(root),
            manifest=str(data_dir / "corpus_manifest.json"),
            manifest_sha256=manifest["sha256"],
        )
        docs, src_stats = corpus.iter_documents(cfg.data, files, root)
    train_docs, val_docs = corpus.split_documents(docs, cfg.data.val_fraction)
    return train_docs, val_docs, {**source, **asdict(src_stats)}


def _hasher_for(cfg: Config, compression):
    """The pipeline's n-gram hasher (None without Engram); the pad id must be a token id."""
    if not 0 <= cfg.engram.pad_id < compression.vocab_size:
        raise ValueError(
            f"engram.pad_id={cfg.engram.pad_id} is not a token id of the "
            f"{compression.vocab_size}-token tokenizer"
        )
    return compression.hasher(cfg.engram, out_dtype=np.int32) if cfg.engram.enabled else None


def _check_processes(batch: int, process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
    if batch % process_count:
        raise ValueError(
            f"train.batch_size={batch} must be divisible by the process count {process_count}"
        )


def _check_windows(windows: dict, n_tokens: dict, seq_len: int) -> None:
    for name, label in (("train", "training"), ("val", "validation")):
        if windows[name].num_windows == 0:
            raise ValueError(
                f"the {label} split has {n_tokens[name]} tokens, fewer than "
                f"train.seq_len+1={seq_len + 1}; use more data or a shorter "
                "seq_len"
            )


def _shuffled_batches(num_windows: int, batch: int, seed: int, make_batch) -> grain.MapDataset:
    """Batch i of an endless shuffled stream of windows (global batch ``batch``); each batch
    is ``make_batch`` of its window indices."""
    return (
        grain.MapDataset.range(num_windows)
        .shuffle(seed=seed % 2**32)
        .repeat()
        .batch(batch, drop_remainder=True)
        .map(make_batch)
    )


def build_data(
    cfg: Config, workdir: str | os.PathLike, *, process_index: int = 0, process_count: int = 1
) -> DataBundle:
    """Read, split, tokenize and pack the corpus; return the Grain pipeline and its stats."""
    batch, seq_len = cfg.train.batch_size, cfg.train.seq_len
    _check_processes(batch, process_index, process_count)
    data_dir = Path(workdir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    train_docs, val_docs, source = _read_corpus(cfg, data_dir)
    sp, tok_path, trained = _tokenizer_for(cfg, train_docs, data_dir)
    compression = build_compression(sp, enabled=cfg.engram.compress_tokenizer)
    hasher = _hasher_for(cfg, compression)

    windows, n_tokens = _token_streams(
        sp, tok_path, {"train": train_docs, "val": val_docs}, data_dir, seq_len
    )
    train_w, val_w = windows["train"], windows["val"]
    _check_windows(windows, n_tokens, seq_len)

    local = batch // process_count
    make_train = _MakeBatch(train_w, compression.lookup, hasher, process_index, local)
    train_ds = _shuffled_batches(train_w.num_windows, batch, cfg.train.seed, make_train)
    stats = {
        **source,
        "train_documents": len(train_docs),
        "val_documents": len(val_docs),
        "train_tokens": n_tokens["train"],
        "val_tokens": n_tokens["val"],
        "train_tokens_file": str(train_w.path),
        "val_tokens_file": str(val_w.path),
        "train_windows": train_w.num_windows,
        "val_windows": val_w.num_windows,
        "steps_per_epoch": max(1, train_w.num_windows // batch),
        "tokenizer": str(tok_path),
        "tokenizer_trained": trained,
        "vocab_size": compression.vocab_size,
        "compressed_vocab_size": compression.num_compressed,
        "compression_ratio": round(compression.ratio, 4),
        "process_index": process_index,
        "process_count": process_count,
        "local_batch": local,
    }
    return DataBundle(
        tokenizer=sp,
        tokenizer_path=tok_path,
        compression=compression,
        hasher=hasher,
        train_dataset=train_ds,
        stats=stats,
        prefetch=cfg.data.prefetch,
        worker_count=cfg.data.worker_count,
        _val=_MakeBatch(val_w, compression.lookup, hasher, process_index, local),
        _val_windows=val_w.num_windows,
        _global_batch=batch,
    )
