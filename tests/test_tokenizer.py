"""Tokenizer training and vocabulary compression, checked against ENGRAM_SPEC section 2."""

import re
import unicodedata

import numpy as np
import pytest

from engram_jax.tokenizer import (
    EOS_ID,
    build_compression,
    identity_compression,
    load_tokenizer,
    train_tokenizer,
)

TEXT = (
    "Apple pie. An apple a day; APPLE inc.\ndef café(x):\n    return x  # Café CAFÉ\n\tindent\n"
) * 20 + "日本語 ünïcödé\n"
SYMBOLS = ("\n", "\t", "Apple", "▁apple", "APPLE", "café", "Café", "CAFÉ")


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "t.model"
    model = train_tokenizer([TEXT], path, vocab_size=320, user_defined_symbols=SYMBOLS)
    assert path.is_file()
    return model


def _spec_key(sp, i):
    """Independent reading of the spec's key for id i."""
    piece = sp.id_to_piece(i)
    text = piece if (sp.is_control(i) or sp.is_unknown(i)) else sp.decode([i])
    if "\ufffd" in text:
        return piece
    t = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    t = "".join(c for c in t if unicodedata.combining(c) == 0).lower()
    t = re.sub("[ \t\r\n]+", " ", t)
    if t != " ":
        t = t.strip()
    return t if t else text


def test_round_trip_and_specials(sp, tmp_path):
    assert sp.get_piece_size() == 320
    assert sp.eos_id() == EOS_ID == 2 and sp.unk_id() == 0 and sp.bos_id() == 1
    assert sp.pad_id() == 3
    s = "def f(x):\n\treturn 'Apple'  # 日本\n"
    assert sp.decode(sp.encode(s)) == s
    assert sp.piece_to_id("\n") not in (sp.unk_id(),) and not sp.is_byte(sp.piece_to_id("\n"))
    assert "\n" in [sp.id_to_piece(i) for i in sp.encode("a\nb")]


def test_variants_collapse(sp):
    table = build_compression(sp)
    ids = [sp.piece_to_id(p) for p in ("Apple", "▁apple", "APPLE")]
    assert len(set(ids)) == 3 and sp.unk_id() not in ids
    assert len({int(table.lookup[i]) for i in ids}) == 1
    cafe = [sp.piece_to_id(p) for p in ("café", "Café", "CAFÉ")]
    assert len({int(table.lookup[i]) for i in cafe}) == 1
    # Accents are stripped: "café" normalizes to "cafe", like a plain "cafe" would.
    assert _spec_key(sp, cafe[0]) == "cafe"


def test_matches_spec_keys_and_first_appearance_order(sp):
    table = build_compression(sp)
    new_of_key, want = {}, []
    for i in range(sp.get_piece_size()):
        want.append(new_of_key.setdefault(_spec_key(sp, i), len(new_of_key)))
    np.testing.assert_array_equal(table.lookup, want)
    assert table.lookup.dtype == np.int64 and table.num_compressed == len(new_of_key)
    assert table.ratio == pytest.approx(1 - table.num_compressed / 320)
    assert 0 < table.ratio < 1
    # First appearance: each new id is exactly one more than every id seen before it.
    seen_max = -1
    for v in table.lookup:
        assert v <= seen_max + 1
        seen_max = max(seen_max, v)
    # Special tokens stay distinct.
    assert len({int(table.lookup[i]) for i in range(4)}) == 4


def test_whitespace_tokens_share_one_space(sp):
    table = build_compression(sp)
    ws = [sp.piece_to_id(p) for p in ("\n", "\t", "▁")]
    assert all(_spec_key(sp, i) == " " for i in ws)
    assert len({int(table.lookup[i]) for i in ws}) == 1


def test_byte_pieces_key_on_raw_piece(sp):
    table = build_compression(sp)
    hi = [sp.piece_to_id(f"<0x{b:02X}>") for b in (0xC3, 0xE6, 0xFF)]
    assert all(sp.is_byte(i) for i in hi)
    assert all("\ufffd" in sp.decode([i]) for i in hi)
    # Three different raw pieces, although all decode to U+FFFD: three compressed ids.
    assert len({int(table.lookup[i]) for i in hi}) == 3
    # An ASCII byte piece decodes to its character and merges with that character's piece.
    a_byte, a_piece = sp.piece_to_id("<0x61>"), sp.piece_to_id("a")
    assert table.lookup[a_byte] == table.lookup[a_piece]


def test_compress_negative_passthrough_and_range(sp):
    table = build_compression(sp)
    ids = np.array([[5, -1, 7], [-100, 0, 319]])
    out = table.compress(ids)
    assert out.dtype == np.int64 and out.shape == ids.shape
    assert out[0, 1] == -1 and out[1, 0] == -100
    assert out[0, 0] == table.lookup[5] and out[1, 2] == table.lookup[319]
    with pytest.raises(ValueError, match="out of range"):
        table.compress([320])


def test_identity_when_disabled(sp):
    table = build_compression(sp, enabled=False)
    np.testing.assert_array_equal(table.lookup, np.arange(320))
    assert table.ratio == 0.0
    np.testing.assert_array_equal(identity_compression(7).compress([3, -1]), [3, -1])


def test_load_and_errors(sp, tmp_path):
    path = tmp_path / "m.model"
    train_tokenizer(tmp_path_file(tmp_path), path, vocab_size=300)
    assert load_tokenizer(path).get_piece_size() == 300
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="SentencePiece"):
        load_tokenizer(bad)
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer(["", "\n"], tmp_path / "e.model", vocab_size=300)
    with pytest.raises(ValueError, match="5000"):
        train_tokenizer(["tiny text"], tmp_path / "small.model", vocab_size=5000)
    # a text of long lines (here one line) trains on all of it: SentencePiece skips every
    # sentence over its max_sentence_length, so long lines are cut before they reach it
    one_line = " ".join((TEXT * 20).split())
    assert len(one_line.encode()) > 4 * 4192
    sp = train_tokenizer([one_line], tmp_path / "long.model", vocab_size=300)
    assert sp.get_piece_size() == 300
    # a text too small for the vocabulary: the error names the largest size that trains, and
    # that size does train
    with pytest.raises(ValueError, match=r"at most (\d+) bpe pieces.*vocab_size=\d+") as e:
        train_tokenizer([TEXT], tmp_path / "big.model", vocab_size=4096)
    most = int(re.search(r"at most (\d+)", str(e.value)).group(1))
    assert (
        train_tokenizer([TEXT], tmp_path / "most.model", vocab_size=most).get_piece_size() == most
    )
    # a vocabulary smaller than the text's characters + byte pieces: the error names the
    # smallest size, and that size trains
    with pytest.raises(ValueError, match=r"need at least (\d+)") as e:
        train_tokenizer([TEXT], tmp_path / "few.model", vocab_size=100)
    least = int(re.search(r"at least (\d+)", str(e.value)).group(1))
    assert least > 256 + len(set(TEXT) - {" ", "\n"})
    assert (
        train_tokenizer([TEXT], tmp_path / "least.model", vocab_size=least).get_piece_size()
        == least
    )
    assert not (tmp_path / "small.model").exists()


def tmp_path_file(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text(TEXT, encoding="utf-8")
    return f
