"""The disk tier: a row-chunked tensorstore table store serves the same rows and the same
generation as resident tables; bad stores and a full disk fail in one line, damaging nothing."""

import errno
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from test_generate import B, V, build, cached_logits, compression, tiny_config

from engram_jax import disk_tier
from engram_jax.batch_generate import BatchGenerator
from engram_jax.disk_tier import (
    DiskRows,
    StoreError,
    disk_host_rows,
    hashing_signature,
    model_shapes,
    model_tables,
    open_store,
    write_store,
)
from engram_jax.generate import Generator
from engram_jax.offload import HostRows


@pytest.fixture(scope="module")
def model():
    return build(tiny_config())


def _sig(model, **changes):
    sig = hashing_signature(model.cfg.engram, compression().num_compressed)
    return {**sig, "source": "test", **changes}


def _write(model, path, **kw):
    # small shards of 128 rows in chunks of 8: several files per layer, partial last shard
    kw = {"shard_rows": 128, "chunk_rows": 8, **kw}
    return write_store(str(path), model_tables(model), model_shapes(model), _sig(model), **kw)


def _tree(path):
    return {
        os.path.relpath(os.path.join(d, n), path): open(os.path.join(d, n), "rb").read()
        for d, _, names in os.walk(path)
        for n in names
    }


def test_store_rows_prefetch_and_generation_match_resident(model, tmp_path):
    store = _write(model, tmp_path / "s")
    tables = model_tables(model)
    disk = open_store(store, _sig(model), model_shapes(model))
    rng = np.random.default_rng(0)
    for i, rows in disk.items():
        ids = rng.integers(0, len(tables[i]), 50)
        np.testing.assert_array_equal(rows.take(ids), tables[i][ids])
        rows.prefetch(ids[:20])  # a prefetched read serves part, the rest is read directly
        np.testing.assert_array_equal(rows.take(ids[10:40]), tables[i][ids[10:40]])
    comp, tokens = compression(), rng.integers(0, V, (B, 11)).astype(np.int32)
    resident = cached_logits(Generator(model, comp, max_len=32, batch=B), tokens, 5)
    for hot in (0, 40):  # straight from disk, and through the device LRU cache
        rows = HostRows(open_store(store, _sig(model), model_shapes(model)), hot_rows=hot)
        gen = Generator(model, comp, max_len=32, batch=B, rows=rows, max_chunk=2)
        np.testing.assert_array_equal(np.asarray(cached_logits(gen, tokens, 5)), resident)
    # the shapes of test_generate's batched tests: their compiled programs serve these
    prompts = [tokens[0, :4], tokens[1, :9], tokens[0, :1]]
    want = BatchGenerator(model, comp, batch=5, max_len=32).generate(prompts, 5).tokens
    got = BatchGenerator(model, comp, batch=5, max_len=32, rows=rows).generate(prompts, 5).tokens
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(s["hits"] > 0 for s in rows.stats().values())


def test_bad_stores_refused_in_one_line(model, tmp_path):
    shapes = model_shapes(model)
    with pytest.raises(StoreError, match="does not exist"):
        open_store(str(tmp_path / "nowhere"), _sig(model), shapes)
    store = _write(model, tmp_path / "s")
    with pytest.raises(StoreError, match=r"another hashing config \(seed: store 0 vs model 1"):
        open_store(store, _sig(model, seed=1), shapes)
    with pytest.raises(StoreError, match="source: store 'test' vs model 'step 9'"):
        open_store(store, _sig(model, source="step 9"), shapes)
    wider = {i: (r, d * 2) for i, (r, d) in shapes.items()}
    with pytest.raises(StoreError, match="the model needs"):
        open_store(store, _sig(model), wider)
    shard = next(p for p in sorted(_tree(store)) if "/c/" in p)
    with open(os.path.join(store, shard), "r+b") as f:
        f.truncate(100)
    with pytest.raises(StoreError, match=f"truncated: {shard} has 100 bytes") as err:
        open_store(store, _sig(model), shapes)
    assert "\n" not in str(err.value)
    os.remove(os.path.join(store, shard))
    with pytest.raises(StoreError, match=f"truncated: {shard} is missing"):
        open_store(store, _sig(model), shapes)
    os.remove(os.path.join(store, "manifest.json"))
    with pytest.raises(StoreError, match="no manifest.json"):
        open_store(store, _sig(model), shapes)
    with pytest.raises(StoreError, match="already exists"):
        _write(model, store)


def test_full_disk_while_writing_keeps_the_old_store(model, tmp_path, monkeypatch):
    store = _write(model, tmp_path / "s")
    before = _tree(store)
    real, calls = disk_tier._write_block, []

    def fails_on_third(array, start, rows):
        calls.append(start)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(array, start, rows)

    monkeypatch.setattr(disk_tier, "_write_block", fails_on_third)
    with pytest.raises(StoreError, match="disk is full.*nothing was replaced"):
        _write(model, store, overwrite=True)
    assert _tree(store) == before  # the old store, byte for byte, and no temp directory left
    assert sorted(os.listdir(tmp_path)) == ["s"]
    open_store(store, _sig(model), model_shapes(model))
    monkeypatch.setattr(disk_tier.shutil, "disk_usage", lambda p: type("U", (), {"free": 10}))
    with pytest.raises(StoreError, match="only 0.00 GB are free"):
        _write(model, tmp_path / "t")
    assert sorted(os.listdir(tmp_path)) == ["s"]


def test_real_full_filesystem(model, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        with pytest.raises(StoreError, match="disk is full"):
            _write(model, mnt / "s", check_space=False)  # 90 KB of rows > 48 KiB
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_disk_host_rows_writes_on_first_use_and_releases(tmp_path):
    model = build(tiny_config(hc_mult=1))
    comp, path = compression(), str(tmp_path / "table_store" / "3")
    tables = model_tables(model)
    rows = disk_host_rows(
        model, comp, path, source="checkpoint step 3", write_missing=True, release=False
    )
    assert isinstance(rows.stores[1], DiskRows) and os.path.isfile(f"{path}/manifest.json")
    np.testing.assert_array_equal(rows.stores[2].take([0, 5]), tables[2][[0, 5]])
    with pytest.raises(StoreError, match="source"):
        disk_host_rows(model, comp, path, source="checkpoint step 4")


@pytest.mark.slow
def test_cli_disk_tier_and_prompts_file(trained_run, tmp_path, capsys):
    from engram_jax.cli import main

    def cli(*args):  # in this process: (exit status, stdout, stderr)
        capsys.readouterr()
        code = main(list(args))
        return (code, *capsys.readouterr())

    wd = str(tmp_path / "run")
    shutil.copytree(trained_run, wd)  # generate writes the table store into the run
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "def main():"}\n\n{"prompt": "import os"}\nclass A\n')
    base = ["generate", "--workdir", wd, "--prompts-file", str(prompts), "--max-new-tokens", "5"]
    code, resident, err = cli(*base, "--batch-size", "1")
    assert code == 0, err[-2000:]
    out = tmp_path / "out.jsonl"
    code, _, err = cli(*base, "--offload", "disk", "--cache-rows", "64", "--out", str(out))
    assert code == 0, err[-2000:]
    assert "writing the Engram table store" in err  # first use: W/table_store/12
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["def main():", "import os", "class A"]
    assert out.read_text() == resident  # batched + disk = one by one + resident
    store = os.path.join(wd, "table_store", "12")
    shard = next(p for p in sorted(_tree(store)) if "/c/" in p)
    with open(os.path.join(store, shard), "r+b") as f:
        f.truncate(10)
    code, _, err = cli(*base, "--offload", "disk", "--out", str(out))
    assert code == 2 and "is truncated" in err
    assert len(err.strip().splitlines()) == 1
    assert out.read_text() == resident  # the earlier output is intact
    code, _, err = cli(*base, "--offload", "disk", "--table-store", str(tmp_path / "none"))
    assert code == 2 and "does not exist" in err
