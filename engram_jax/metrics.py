"""Run metrics: ``metrics.jsonl`` and TensorBoard events, written by process 0 only."""

from __future__ import annotations

import json
import os


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per logged step) and TensorBoard events beside it.
    Only process 0 writes. On resume, records after the restored step are dropped (they came
    from the interrupted run and will be produced again)."""

    def __init__(self, workdir: str, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= resume_step]
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(keep)
            os.replace(tmp, self.path)
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tb"))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
