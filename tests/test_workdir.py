"""Workdir paths through one abstraction: a ``gs://`` workdir goes to the bucket (here an
in-memory fsspec filesystem registered for gs://, no network), never to a local ``gs:``
directory; unsupported schemes are refused with one line naming what to use."""

import json
import os
import sys

import pytest

from engram_jax import paths
from engram_jax.config import override
from engram_jax.metrics import MetricsLog
from engram_jax.presets import get_preset
from engram_jax.workdir import Workdir


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
    import fsspec
    from etils.epath import backend
    from fsspec.implementations.memory import MemoryFileSystem

    class FakeGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")
        store: dict = {}
        pseudo_dirs = [""]

        def __init__(self, *args, finalize_on_close=None, **kw):
            super().__init__(*args, **kw)

    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    monkeypatch.setenv("ENGRAM_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # a local "gs:" directory would appear here
    yield FakeGCS
    FakeGCS.store.clear()
    for name in ("gs", "gcs"):
        sys.modules["fsspec.registry"]._registry.pop(name, None)
    backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.mark.parametrize(
    "bad, message", [("s3://b/run", "s3:// is not supported"), ("gs://", "give a bucket")]
)
def test_unsupported_workdirs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message) as e:
        Workdir(bad)
    assert "\n" not in str(e.value)


def test_local_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(Workdir("run").path) == str(tmp_path / "run")


def test_gs_workdir_files_live_in_the_bucket(fake_gcs, tmp_path):
    wd = Workdir("gs://bucket/run")
    cfg = override(get_preset("tiny"), ["train.steps=7"])
    wd.write_config(cfg)
    assert wd.read_config() == cfg
    wd.write_summary({"status": "ok"})
    assert wd.read_summary() == {"status": "ok"}

    tok = tmp_path / "trained.model"
    tok.write_bytes(b"sentencepiece bytes")
    wd.publish_tokenizer(tok)
    local = wd.tokenizer()  # SentencePiece reads local files: a local copy
    assert paths.is_local(local) and open(local, "rb").read() == b"sentencepiece bytes"

    # the token cache: built locally, published to the bucket, pulled by another worker
    (wd.data_root() / "data").mkdir(parents=True, exist_ok=True)
    (wd.data_root() / "data" / "tokens-train-abc.npy").write_bytes(b"tokens")
    (wd.data_root() / "data" / "tokens-train-abc.tmp12.npy").write_bytes(b"partial")
    assert wd.push_data() == ["tokens-train-abc.npy"]
    (wd.data_root() / "data" / "tokens-train-abc.npy").unlink()
    assert wd.pull_data() == ["tokens-train-abc.npy"]

    log = MetricsLog(wd.path, 0, enabled=True)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step})
    log.close()
    assert [r["step"] for r in wd.metrics()] == [1, 2, 3]
    MetricsLog(wd.path, 2, enabled=True).close()  # resumed from step 2: step 3 is dropped
    assert [r["step"] for r in wd.metrics()] == [1, 2]

    stored = set(fake_gcs.store)
    for name in ("config.json", "summary.json", "tokenizer.model", "metrics.jsonl"):
        assert f"gs://bucket/run/{name}" in stored, sorted(stored)
    assert "gs://bucket/run/data/tokens-train-abc.npy" in stored
    assert not any(".tmp" in k for k in stored)
    assert any(k.startswith("gs://bucket/run/tb/events.out.tfevents") for k in stored)
    assert json.loads(fake_gcs.store["gs://bucket/run/summary.json"].getvalue()) == {"status": "ok"}
    assert not os.path.exists(tmp_path / "gs:")


def test_missing_run_and_tokenizer_name_the_file(tmp_path):
    wd = Workdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        wd.load()
    with pytest.raises(FileNotFoundError, match="tokenizer.model is missing"):
        wd.tokenizer()
