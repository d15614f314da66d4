"""SentencePiece training/loading and Engram's vocabulary compression (ENGRAM_SPEC section 2).

Compression is a surjection P: V -> V'. Each id is decoded alone to text and normalized
(NFKC, NFD, drop combining marks, lowercase, collapse runs of space/tab/CR/LF to one space,
strip; a text that is exactly one space stays " "). Ids with equal keys share a compressed id,
numbered in first-appearance order over 0..V-1. A text containing U+FFFD (a partial UTF-8 byte)
keys on its raw piece instead; an empty normalization keys on the raw text. Negative ids pass
through unchanged.

Tokenizers trained here use identity normalization, keep every space (code indentation) and no
dummy prefix, so ``decode(encode(s)) == s`` and ``decode([id])`` is the token's exact surface text.
Special ids are fixed: unk 0, bos 1, eos 2 (the default ``EngramConfig.pad_id``), pad 3.
"""

from __future__ import annotations

import io
import os
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from engram_jax.corpus import cut

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# Training is line by line, so "\n" would only ever be byte fallback unless declared.
DEFAULT_USER_SYMBOLS = ("\n", "\t")
_WS_RUN = re.compile(r"[ \t\r\n]+")


# ---------------------------------------------------------------------------------------------
# Training and loading


# SentencePiece skips, without a word, every training sentence longer than this many bytes
# (its max_sentence_length, left at its default); longer lines are cut into pieces of at most
# a quarter as many characters (4 bytes each at most in UTF-8), so a text of long lines still
# trains, and the tokenizer of a text without such lines is unchanged.
_MAX_SENTENCE_BYTES = 4192


def _lines(texts: Iterable[str], max_bytes: int):
    """Yield the non-empty lines of ``texts`` until about ``max_bytes`` have been yielded."""
    total = 0
    for text in texts:
        for line in text.split("\n"):
            if not line:
                continue
            long = len(line) * 4 > _MAX_SENTENCE_BYTES and len(line.encode()) > _MAX_SENTENCE_BYTES
            for piece in cut(line, _MAX_SENTENCE_BYTES // 4) if long else (line,):
                yield piece
                total += len(piece) + 1
                if max_bytes and total >= max_bytes:
                    return


# SentencePiece training options of every tokenizer trained here: byte fallback, the special ids
# above, text kept as it is (no normalization, whitespace pieces), digits split, deterministic.
_TRAINER_OPTIONS = {
    "byte_fallback": True,
    "character_coverage": 1.0,
    "unk_id": UNK_ID,
    "bos_id": BOS_ID,
    "eos_id": EOS_ID,
    "pad_id": PAD_ID,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": False,
    "allow_whitespace_only_pieces": True,
    "split_digits": True,
    "shuffle_input_sentence": False,
    "hard_vocab_limit": True,
    "minloglevel": 2,
}


def _training_error(message: str, vocab_size: int, model_type: str) -> ValueError:
    """SentencePiece's training failure as a one-line error; the two a user fixes with a
    number (a vocabulary too large or too small for the text) name that number."""
    most = re.search(r"Vocabulary size too high.*<= (\d+)", message)
    if most:
        return ValueError(
            f"the training text supports at most {most.group(1)} {model_type} pieces, not "
            f"vocab_size={vocab_size}: give more text or a smaller vocabulary (engram-jax: "
            f"--set model.vocab_size={most.group(1)})"
        )
    least = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if least:  # the text's characters + the 256 byte pieces + the special pieces
        return ValueError(
            f"a {model_type} vocabulary of {vocab_size} pieces is too small for this text: "
            f"its characters, the 256 byte-fallback pieces and the special pieces need at "
            f"least {least.group(1)} (engram-jax: --set model.vocab_size={least.group(1)})"
        )
    return ValueError(
        f"SentencePiece could not train a {vocab_size}-piece {model_type} tokenizer: {message}"
    )


def train_tokenizer(
    texts: Iterable[str] | str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    user_defined_symbols: tuple[str, ...] = DEFAULT_USER_SYMBOLS,
    max_bytes: int = 20_000_000,
    num_threads: int | None = None,
) -> spm.SentencePieceProcessor:
    """Train a byte-fallback SentencePiece model on texts (or a text file) and save it.

    The result has exactly ``vocab_size`` pieces or a ``ValueError`` says why not (usually: the
    corpus is too small for that many pieces). Training reads at most ``max_bytes`` of text.
    """
    if isinstance(texts, (str, os.PathLike)):
        path = Path(texts)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer training file not found: {path}")
        texts = [path.read_text(encoding="utf-8", errors="replace")]
    lines = _lines(texts, max_bytes)
    first = next(lines, None)
    if first is None:
        raise ValueError("cannot train a tokenizer on empty text")
    proto = io.BytesIO()
    spm.set_random_generator_seed(0)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_chain(first, lines),
            model_writer=proto,
            vocab_size=vocab_size,
            model_type=model_type,
            user_defined_symbols=list(user_defined_symbols),
            num_threads=num_threads or os.cpu_count() or 1,
            **_TRAINER_OPTIONS,
        )
    except RuntimeError as e:
        raise _training_error(str(e), vocab_size, model_type) from None
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    if sp.get_piece_size() != vocab_size:
        raise ValueError(
            f"trained tokenizer has {sp.get_piece_size()} pieces, wanted "
            f"{vocab_size}: the corpus is too small for this vocabulary size"
        )
    _write_atomically(Path(out_path), proto.getvalue())
    return sp


def _write_atomically(out_path: Path, data: bytes) -> None:
    """A crash never leaves a truncated model behind: write a temp file, then rename it."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f"{out_path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, out_path)


def _chain(first, rest):
    yield first
    yield from rest


def load_tokenizer(path: str | os.PathLike) -> spm.SentencePieceProcessor:
    """Load a SentencePiece ``.model``; a missing or unreadable file raises with its path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model not found: {path}")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"not a SentencePiece model: {path} ({e})") from None


# ---------------------------------------------------------------------------------------------
# Vocabulary compression


def normalize_text(text: str) -> str:
    """NFKC -> NFD -> drop combining marks -> lowercase -> collapse whitespace -> strip."""
    t = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    t = "".join(c for c in t if not unicodedata.combining(c)).lower()
    t = _WS_RUN.sub(" ", t)
    return t if t == " " else t.strip()


def token_text(sp: spm.SentencePieceProcessor, token_id: int) -> str:
    """The text of one id decoded alone; control and unknown ids decode to their piece string
    (as a decode that keeps special tokens would), so they stay distinct."""
    if sp.is_control(token_id) or sp.is_unknown(token_id):
        return sp.id_to_piece(token_id)
    return sp.decode([token_id])


def token_key(sp: spm.SentencePieceProcessor, token_id: int) -> str:
    """The compression key of one id (ENGRAM_SPEC section 2)."""
    text = token_text(sp, token_id)
    if "\ufffd" in text:
        return sp.id_to_piece(token_id)
    return normalize_text(text) or text


@dataclass(frozen=True, eq=False)
class CompressionTable:
    """``lookup[raw_id] -> compressed id`` (int64 ``[V]``), ``num_compressed = V'``."""

    lookup: np.ndarray
    num_compressed: int

    @property
    def vocab_size(self) -> int:
        return int(self.lookup.shape[0])

    @property
    def ratio(self) -> float:
        """Fraction of the vocabulary removed: 1 - V'/V."""
        return 1.0 - self.num_compressed / self.vocab_size

    def compress(self, ids) -> np.ndarray:
        """Map raw ids (any shape) to compressed ids; negative ids (padding) pass through."""
        x = np.asarray(ids, dtype=np.int64)
        if x.size and x.max() >= self.vocab_size:
            raise ValueError(
                f"token id {x.max()} out of range for a vocabulary of {self.vocab_size}"
            )
        return np.where(x >= 0, self.lookup[np.maximum(x, 0)], x)

    __call__ = compress

    def hasher(self, engram_cfg, out_dtype=np.int64):
        """The :class:`~engram_jax.hashing.NgramHasher` of compressed ids from this table: the
        compressed vocabulary size, and the pad id compressed like every other id."""
        from engram_jax.hashing import NgramHasher

        pad = int(self.lookup[engram_cfg.pad_id])
        return NgramHasher(engram_cfg, self.num_compressed, pad, out_dtype=out_dtype)


def identity_compression(vocab_size: int) -> CompressionTable:
    """The table used when ``EngramConfig.compress_tokenizer`` is False."""
    return CompressionTable(np.arange(vocab_size, dtype=np.int64), vocab_size)


def build_compression(
    sp: spm.SentencePieceProcessor,
    *,
    enabled: bool = True,
) -> CompressionTable:
    """Compression table of a tokenizer; ``enabled=False`` gives the identity."""
    size = sp.get_piece_size()
    if not enabled:
        return identity_compression(size)
    key_to_new: dict[str, int] = {}
    lookup = np.empty(size, dtype=np.int64)
    for token_id in range(size):
        lookup[token_id] = key_to_new.setdefault(token_key(sp, token_id), len(key_to_new))
    return CompressionTable(lookup, len(key_to_new))
