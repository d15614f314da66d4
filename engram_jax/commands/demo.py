"""``engram-jax demo``: one Engram layer's forward pass on real text (Python stdlib source).

Pipeline: read a few KB of the standard library -> tokenize (a small BPE trained on the spot,
a given SentencePiece model, or raw UTF-8 bytes) -> compress the vocabulary -> hash n-grams
-> look up, gate and convolve in one Engram layer -> print what happened. The hidden states
are a fixed random embedding of the tokens copied to every mHC branch (no backbone), so the
gates show the layer's arithmetic, not trained behaviour.
"""

from __future__ import annotations

from engram_jax.commands import add_command, add_set_arg


def add_parser(sub) -> None:
    p = add_command(sub, "demo", "run one Engram layer on a few KB of real text", __doc__)
    p.add_argument("--preset", default="tiny", help="config whose Engram/backbone sizes to use")
    add_set_arg(p, "engram.max_ngram_size=4")
    p.add_argument("--kb", type=float, default=8.0, help="KB of stdlib source to run on")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model to use")
    p.add_argument("--bytes", action="store_true", help="raw UTF-8 bytes as tokens (V=256)")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=1024,
        help="pieces of the BPE trained on the spot (when no --tokenizer/--bytes)",
    )
    p.set_defaults(func=run)


def _stdlib_text(n_bytes: int) -> tuple[str, int]:
    """The first ``n_bytes`` of the stdlib's top-level .py files, in name order."""
    import pathlib
    import sysconfig

    parts, total, files = [], 0, 0
    for path in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
        total, files = total + len(parts[-1]), files + 1
        if total >= n_bytes:
            break
    return "".join(parts)[:n_bytes], files


def _byte_compression():
    """The spec's compression rule applied to a byte vocabulary: an ASCII byte keys on its
    normalized text (so case folds and whitespace merges); a byte >= 128 decodes to U+FFFD alone
    and keys on its raw piece (stays distinct)."""
    import numpy as np

    from engram_jax.tokenizer import CompressionTable, normalize_text

    keys: dict[str, int] = {}
    lookup = np.empty(256, np.int64)
    for b in range(256):
        key = (normalize_text(chr(b)) or chr(b)) if b < 128 else f"<0x{b:02X}>"
        lookup[b] = keys.setdefault(key, len(keys))
    return CompressionTable(lookup, len(keys))


def _tokenize(args, text: str):
    """-> (raw ids, CompressionTable, description)."""
    import numpy as np

    if args.bytes:
        return (
            np.frombuffer(text.encode(), np.uint8).astype(np.int64),
            _byte_compression(),
            "UTF-8 bytes",
        )
    import tempfile
    from pathlib import Path

    from engram_jax.tokenizer import build_compression, load_tokenizer, train_tokenizer

    if args.tokenizer:
        sp, what = load_tokenizer(args.tokenizer), f"SentencePiece {args.tokenizer}"
    else:
        corpus, _ = _stdlib_text(1_000_000)
        with tempfile.TemporaryDirectory() as tmp:
            sp = train_tokenizer(
                [corpus], Path(tmp) / "demo.model", vocab_size=args.vocab_size, max_bytes=1_000_000
            )
        what = f"BPE trained on 1 MB of stdlib, {args.vocab_size} pieces"
    return np.asarray(sp.encode(text), np.int64), build_compression(sp), what


def _hashed_text(args, ecfg, layer):
    """The demo text tokenized into ``--seq-len`` rows and hashed for ``layer``: ``(raw_BxT,
    compression table, hasher, ids_BxTxH, tokenizer description, chars, files)``."""
    import numpy as np

    from engram_jax.tokenizer import identity_compression

    text, n_files = _stdlib_text(int(args.kb * 1024))
    raw, table, tok_what = _tokenize(args, text)
    n_seq = len(raw) // args.seq_len
    if n_seq < 1:
        raise ValueError(f"{len(raw)} tokens < --seq-len {args.seq_len}: use more --kb")
    raw_BxT = raw[: n_seq * args.seq_len].reshape(n_seq, args.seq_len)
    if not ecfg.compress_tokenizer:
        table = identity_compression(table.vocab_size)
    hasher = table.hasher(ecfg, out_dtype=np.int32)
    ids_BxTxH = hasher(table.compress(raw_BxT))[layer]
    return raw_BxT, table, hasher, ids_BxTxH, tok_what, len(text), n_files


def _run_layer(cfg, layer, sizes, vocab_size, raw_BxT, ids_BxTxH):
    """One Engram layer (random init) on random embeddings of ``raw_BxT``, compiled then timed:
    ``(engram, h_BxTxMxD, y_BxTxMxD, gates_BxTxM, compile s, forward s)``."""
    import time

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from engram_jax.engram import Engram

    ecfg, m = cfg.engram, cfg.model
    rngs = nnx.Rngs(cfg.train.seed)
    engram = Engram(ecfg, layer, m.d_model, m.hc_mult, table_sizes=sizes, rngs=rngs, dtype=m.dtype)
    embed_VxD = jax.random.normal(rngs.params(), (vocab_size, m.d_model))
    h_BxTxMxD = jnp.repeat(embed_VxD[raw_BxT][:, :, None, :], m.hc_mult, axis=2)

    forward = nnx.jit(lambda mod, h, ids: mod(h, ids=ids, return_gates=True))
    t0 = time.perf_counter()
    jax.block_until_ready(forward(engram, h_BxTxMxD, ids_BxTxH))
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    y_BxTxMxD, gates_BxTxM = jax.block_until_ready(forward(engram, h_BxTxMxD, ids_BxTxH))
    return engram, h_BxTxMxD, y_BxTxMxD, gates_BxTxM, t_compile, time.perf_counter() - t0


def run(args) -> int:
    import time

    import numpy as np

    from engram_jax.config import override
    from engram_jax.presets import get_preset

    cfg = override(get_preset(args.preset), args.sets)
    ecfg, m = cfg.engram, cfg.model
    if not ecfg.enabled:
        raise ValueError("engram.layer_ids is empty: nothing to demo")
    layer = ecfg.layer_ids[0]
    t0 = time.perf_counter()
    raw_BxT, table, hasher, ids_BxTxH, tok_what, chars, n_files = _hashed_text(args, ecfg, layer)
    t_prep = time.perf_counter() - t0

    sizes = hasher.table_sizes[layer]
    engram, h_BxTxMxD, y_BxTxMxD, gates_BxTxM, t_compile, t_run = _run_layer(
        cfg, layer, sizes, table.vocab_size, raw_BxT, ids_BxTxH
    )
    rows = engram.table.global_ids(ids_BxTxH)
    g = np.asarray(gates_BxTxM, np.float32)
    n_tok, (n_seq, seq_len) = raw_BxT.size, raw_BxT.shape
    v_prime, pad = table.num_compressed, hasher.pad_id
    print(f"text      {chars:,} chars from {n_files} stdlib files")
    print(
        f"tokens    {n_tok:,} ({tok_what}) as {n_seq} x {seq_len}; first: {raw_BxT[0, :8].tolist()}"
    )
    print(
        f"compress  V={table.vocab_size:,} -> V'={v_prime:,} "
        f"({1 - v_prime / table.vocab_size:.1%} fewer ids), pad id {pad}"
    )
    print(
        f"hashing   layer {layer}: orders 2..{ecfg.max_ngram_size} x {ecfg.n_head_per_ngram} "
        f"heads = {ecfg.n_hash_heads} ids/token; primes per order {sizes}"
    )
    print(
        f"table     {engram.table.n_rows:,} rows x {ecfg.d_head} = "
        f"{engram.table.table[...].size:,} params; this text touched "
        f"{len(np.unique(np.asarray(rows))):,} distinct rows of {rows.size:,} lookups"
    )
    print(
        f"layer     h {tuple(h_BxTxMxD.shape)} + ids {ids_BxTxH.shape} -> "
        f"y {tuple(y_BxTxMxD.shape)} {y_BxTxMxD.dtype} (d_mem {ecfg.d_mem}, M={m.hc_mult})"
    )
    print(f"gates     mean {g.mean():.4f}  min {g.min():.4f}  max {g.max():.4f}")
    y = np.asarray(y_BxTxMxD, np.float32)
    print(
        f"output    RMS {np.sqrt(np.mean(y * y)):.4f}  per-token L2 mean "
        f"{np.linalg.norm(y, axis=-1).mean():.4f}"
    )
    print(
        f"time      tokenizer+hash {t_prep * 1e3:.0f} ms, compile {t_compile * 1e3:.0f} ms, "
        f"forward {t_run * 1e3:.1f} ms ({n_tok / t_run:,.0f} tokens/s)"
    )
    return 0
