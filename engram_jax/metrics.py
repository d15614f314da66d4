"""Run metrics: ``metrics.jsonl`` and TensorBoard events, written by process 0 only.

Both go through :mod:`engram_jax.paths`, so a ``gs://`` workdir gets them in the bucket. Object
stores cannot append: there the whole ``metrics.jsonl`` (and each event file) is rewritten when
written, which is cheap at the log cadence.
"""

from __future__ import annotations

import io
import json

from etils import epath

from engram_jax import paths


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per logged step) and TensorBoard events beside it.
    Only process 0 writes. On resume, records after the restored step are dropped (they came
    from the interrupted run and will be produced again)."""

    def __init__(self, workdir, resume_step: int, enabled: bool):
        self.enabled = enabled
        root = paths.as_path(workdir)
        self.path = root / "metrics.jsonl"
        self.tb = None
        self._lines: list[str] = []
        if not enabled:
            return
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            keep = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= resume_step]
            self._lines = keep
            paths.write_text(self.path, "".join(keep))
        from tensorboardX import SummaryWriter

        _register_tensorboard_scheme()
        self.tb = SummaryWriter(str(root / "tb"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(record) + "\n"
        self._lines.append(line)
        if paths.is_local(self.path):
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line)
        else:
            paths.write_text(self.path, "".join(self._lines))
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class _EventFile:
    """A TensorBoard event file on an ``epath`` (object store): buffered, rewritten on flush."""

    def __init__(self, path: str):
        self.path, self.buffer = epath.Path(path), io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        paths.write_bytes(self.path, self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _EventFiles:
    def open(self, path: str) -> _EventFile:
        return _EventFile(path)

    def directory_check(self, path: str) -> None:
        pass  # object stores have no directories to create


def _register_tensorboard_scheme() -> None:
    """Route tensorboardX's remote event files through epath (its own gs:// writer needs the
    google-cloud-storage client and credentials of its own)."""
    from tensorboardX import record_writer

    for s in paths.SCHEMES:
        record_writer.register_writer_factory(s, _EventFiles())
