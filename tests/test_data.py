"""The Grain input pipeline on tiny corpora written to tmp_path."""

import dataclasses
import json

import numpy as np
import pytest

from engram_jax.config import Config, DataConfig, EngramConfig, ModelConfig, TrainConfig
from engram_jax.data import build_data
from engram_jax.hashing import NgramHasher
from engram_jax.tokenizer import train_tokenizer

VOCAB = 320
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "Apple",
    "apple",
    "APPLE",
    "café",
    "return",
    "def",
    "class",
    "lambda",
    "yield",
    "import",
    "from",
    "self",
    "value",
    "index",
    "token",
    "memory",
    "engram",
    "hash",
    "table",
    "lookup",
    "gate",
]


def _text(seed: int, n_lines: int = 60) -> str:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n_lines):
        words = rng.choice(WORDS, size=rng.integers(3, 10))
        lines.append("    " * int(rng.integers(0, 3)) + " ".join(words))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        sub = root / ("sub" if i % 3 == 0 else "")
        sub.mkdir(exist_ok=True)
        (sub / f"doc{i:02d}.txt").write_text(_text(i), encoding="utf-8")
    (root / "broken.txt").write_bytes(
        b"valid start \xff\xfe then bytes that are not utf-8\n" + _text(99).encode()
    )
    (root / "image.bin").write_bytes(b"\x89PNG\x00\x00binary")
    return root


def _cfg(path, **train):
    return Config(
        model=ModelConfig(vocab_size=VOCAB),
        engram=EngramConfig(
            engram_vocab_size=(211, 223), n_head_per_ngram=2, n_embed_per_ngram=8, layer_ids=(0, 1)
        ),
        data=DataConfig(path=str(path), val_fraction=0.2, prefetch=2),
        train=TrainConfig(**{"batch_size": 4, "seq_len": 16, "seed": 3, **train}),
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def bundle(corpus_dir, workdir):
    return build_data(_cfg(corpus_dir), workdir)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])
        assert x["engram_ids"].keys() == y["engram_ids"].keys()
        for k in x["engram_ids"]:
            np.testing.assert_array_equal(x["engram_ids"][k], y["engram_ids"][k])


def test_shapes_dtypes_and_shift(bundle, workdir):
    batch = next(bundle.train_iter())
    assert batch["inputs"].shape == batch["targets"].shape == (4, 16)
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
    assert set(batch["engram_ids"]) == {0, 1}
    for ids in batch["engram_ids"].values():
        assert ids.shape == (4, 16, 4) and ids.dtype == np.int32
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    # Each row is a window of the packed training stream starting at a multiple of seq_len.
    stream = np.load(bundle.stats["train_tokens_file"])
    for row_in, row_tg in zip(batch["inputs"], batch["targets"]):
        window = np.concatenate([row_in, row_tg[-1:]])
        starts = [
            s for s in range(0, len(stream) - 16, 16) if np.array_equal(stream[s : s + 17], window)
        ]
        assert starts, "row is not a stride-T window of the training stream"
    assert 0 <= batch["inputs"].min() and batch["inputs"].max() < VOCAB


def test_engram_ids_match_hasher_on_compressed_inputs(bundle, corpus_dir):
    cfg = _cfg(corpus_dir)
    comp = bundle.compression
    assert comp.num_compressed < VOCAB  # Apple/apple/APPLE and whitespace runs merge
    hasher = NgramHasher(cfg.engram, comp.num_compressed, pad_id=int(comp.lookup[2]))
    for batch in _take(bundle.train_iter(), 3):
        want = hasher(comp.lookup[batch["inputs"]])
        for lid in (0, 1):
            np.testing.assert_array_equal(batch["engram_ids"][lid], want[lid])


def test_stats_and_non_utf8_counted(bundle):
    s = bundle.stats
    assert s["non_utf8_documents"] == 1 and s["non_utf8_files"] == 1
    assert s["skipped_binary_files"] == 1
    assert s["documents"] == 13 == s["train_documents"] + s["val_documents"]
    assert s["val_documents"] >= 1 and s["train_windows"] > 4
    assert s["vocab_size"] == VOCAB and 0 < s["compression_ratio"] < 1
    assert s["tokenizer_trained"] is True


def test_resume_from_state(bundle):
    it = bundle.train_iter()
    _take(it, 5)
    state = it.get_state()
    want = _take(it, 4)
    fresh = bundle.train_iter()
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 4), want)
    # Determinism across pipeline instances too.
    _assert_batches_equal(_take(bundle.train_iter(), 3), _take(bundle.train_iter(), 3))


def test_checkpoint_round_trip(bundle, tmp_path):
    from engram_jax.checkpoint import Checkpointer

    it = bundle.train_iter()
    _take(it, 3)
    state = {"step": np.int32(3)}
    ckpt = Checkpointer(tmp_path)
    ckpt.save(3, state, it, {})
    ckpt.wait()
    want = _take(it, 2)
    fresh = bundle.train_iter()
    assert int(ckpt.restore(3, state, fresh)["step"]) == 3
    ckpt.close()
    _assert_batches_equal(_take(fresh, 2), want)


def test_process_slices_concatenate_to_global_batch(bundle, corpus_dir, workdir):
    parts = [
        build_data(_cfg(corpus_dir), workdir, process_index=i, process_count=2) for i in range(2)
    ]
    assert all(p.stats["tokenizer_trained"] is False for p in parts)  # cached tokenizer reused
    assert parts[1].stats["train_tokens_file"] == bundle.stats["train_tokens_file"]
    whole = _take(bundle.train_iter(), 3)
    halves = [_take(p.train_iter(), 3) for p in parts]
    for w, a, b in zip(whole, *halves, strict=True):
        assert a["inputs"].shape == (2, 16)
        np.testing.assert_array_equal(np.concatenate([a["inputs"], b["inputs"]]), w["inputs"])
        np.testing.assert_array_equal(np.concatenate([a["targets"], b["targets"]]), w["targets"])
        for lid in (0, 1):
            np.testing.assert_array_equal(
                np.concatenate([a["engram_ids"][lid], b["engram_ids"][lid]]), w["engram_ids"][lid]
            )
    val = [p.val_batches(2) for p in parts]
    for w, a, b in zip(bundle.val_batches(2), *val, strict=True):
        np.testing.assert_array_equal(np.concatenate([a["inputs"], b["inputs"]]), w["inputs"])


def test_validation_batches_fixed(bundle):
    a, b = bundle.val_batches(3), bundle.val_batches(3)
    assert len(a) == 3
    _assert_batches_equal(a, b)


def test_jsonl_source(tmp_path):
    path = tmp_path / "d.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in range(20):
            f.write(json.dumps({"body": _text(i, 20), "id": i}) + "\n")
    cfg = dataclasses.replace(
        _cfg(path), data=DataConfig(path=str(path), text_field="body", val_fraction=0.2)
    )
    b = build_data(cfg, tmp_path / "w")
    assert b.stats["documents"] == 20
    assert next(b.train_iter())["inputs"].shape == (4, 16)
    bad = _cfg(path)  # default text_field "text" is missing
    with pytest.raises(ValueError, match="no text field 'text'"):
        build_data(bad, tmp_path / "w2")


def test_default_corpus_manifest(tmp_path):
    cfg = Config(
        model=ModelConfig(vocab_size=512),
        engram=EngramConfig(
            engram_vocab_size=(211, 223), n_head_per_ngram=2, n_embed_per_ngram=8, layer_ids=(1,)
        ),
        data=DataConfig(max_bytes=150_000, max_files=40, val_fraction=0.1),
        train=TrainConfig(batch_size=2, seq_len=32),
    )
    b = build_data(cfg, tmp_path)
    manifest = json.loads((tmp_path / "data" / "corpus_manifest.json").read_text())
    assert manifest["files"] and all(len(f["sha256"]) == 64 for f in manifest["files"])
    assert manifest["total_bytes"] <= 150_000 and len(manifest["files"]) <= 40
    paths = [f["path"] for f in manifest["files"]]
    assert all(p.endswith(".py") and "site-packages" not in p for p in paths)
    assert b.stats["manifest_sha256"] == manifest["sha256"]
    assert next(b.train_iter())["engram_ids"][1].shape == (2, 32, 4)


def test_bad_inputs_raise(corpus_dir, tmp_path, bundle):
    with pytest.raises(FileNotFoundError, match="not found"):
        build_data(_cfg(tmp_path / "missing"), tmp_path / "w")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n\n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        build_data(_cfg(empty), tmp_path / "w")
    with pytest.raises(ValueError, match="divisible"):
        build_data(_cfg(corpus_dir), tmp_path / "w", process_count=3)
    # A tokenizer whose size differs from model.vocab_size: the message names both.
    other = tmp_path / "other.model"
    train_tokenizer([_text(1, 200)], other, vocab_size=300)
    cfg = dataclasses.replace(
        _cfg(corpus_dir), data=DataConfig(path=str(corpus_dir), tokenizer=str(other))
    )
    with pytest.raises(ValueError, match=r"300.*model.vocab_size=320"):
        build_data(cfg, tmp_path / "w")
    # Too little text for one window of seq_len + 1 tokens.
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    for i in range(2):
        (tiny / f"{i}.txt").write_text(_text(i, 3))
    cfg = dataclasses.replace(
        _cfg(tiny, seq_len=512),
        data=DataConfig(path=str(tiny), tokenizer=str(bundle.tokenizer_path)),
    )
    with pytest.raises(ValueError, match="fewer than train.seq_len"):
        build_data(cfg, tmp_path / "w")


def test_dataset_pickles_for_workers(bundle):
    """mp_prefetch ships the dataset to spawned workers with cloudpickle."""
    cloudpickle = pytest.importorskip("cloudpickle")
    ds = cloudpickle.loads(cloudpickle.dumps(bundle.train_dataset))
    _assert_batches_equal([ds[0], ds[1]], [bundle.train_dataset[0], bundle.train_dataset[1]])


def test_a_file_of_lines_without_blank_lines_is_cut_into_documents(tmp_path, workdir):
    """One sentence per line, no blank line (a common corpus shape): documents of
    LINES_PER_DOCUMENT lines, in order, nothing lost; train/validation both non-empty, and the
    pipeline builds batches from it (what ``train`` and ``sweep`` do with --data)."""
    from engram_jax import corpus

    n = 5 * corpus.LINES_PER_DOCUMENT + 7
    lines = [f"verse {i}: " + _text(i, 1).strip() for i in range(n)]
    path = tmp_path / "verses.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs, stats = corpus.iter_documents(DataConfig(path=str(path)))
    assert len(docs) == stats.documents == 6
    got = [ln for d in docs for ln in d.text.splitlines()]
    assert got == lines
    assert [len(d.text.splitlines()) for d in docs] == [corpus.LINES_PER_DOCUMENT] * 5 + [7]
    train, val = corpus.split_documents(docs, 0.2)
    assert train and val
    b = build_data(_cfg(path), tmp_path / "w")
    assert next(b.train_iter())["inputs"].shape == (4, 16)
    # paragraphs separated by blank lines still make one document each
    path.write_text("first para\nline two\n\nsecond para\n", encoding="utf-8")
    docs, _ = corpus.iter_documents(DataConfig(path=str(path)))
    assert [d.text for d in docs] == ["first para\nline two\n", "second para\n"]
    path.write_text("a single line\n", encoding="utf-8")
    docs, _ = corpus.iter_documents(DataConfig(path=str(path)))
    with pytest.raises(ValueError, match="at least 2 documents.*more than 64 lines"):
        corpus.split_documents(docs, 0.2)


def test_a_text_on_one_line_is_cut_into_documents(tmp_path):
    """A long text with no line breaks (or one very long line among others) is cut into
    documents of at most CHARS_PER_DOCUMENT characters, at spaces, in order, nothing lost;
    a piece without spaces is cut at the limit."""
    from engram_jax import corpus

    n = corpus.CHARS_PER_DOCUMENT
    words = [f"w{i % 997}" for i in range(n)]  # ~4.5 characters a word
    path = tmp_path / "one.txt"
    path.write_text(" ".join(words) + "\nshort last line\n", encoding="utf-8")
    docs, _ = corpus.iter_documents(DataConfig(path=str(path)))
    assert len(docs) > 3 and all(len(d.text) <= n + 1 for d in docs)  # + the final "\n"
    assert "".join(d.text[:-1] for d in docs) == " ".join(words) + "\nshort last line"
    assert all(d.text[:-1].endswith(" ") for d in docs[:-1])  # words kept whole
    train, val = corpus.split_documents(docs, 0.2)
    assert train and val
    path.write_text("x" * (2 * n + 5), encoding="utf-8")  # no space at all
    docs, _ = corpus.iter_documents(DataConfig(path=str(path)))
    assert [len(d.text) for d in docs] == [n + 1, n + 1, 6]
    # a directory holding that one file reads as the file; with two files, one per document
    docs, _ = corpus.iter_documents(DataConfig(path=str(tmp_path)))
    assert [len(d.text) for d in docs] == [n + 1, n + 1, 6]
    (tmp_path / "two.txt").write_text("a\n\nb\n", encoding="utf-8")
    docs, _ = corpus.iter_documents(DataConfig(path=str(tmp_path)))
    assert [d.key for d in docs] == ["one.txt", "two.txt"]
