"""A training run's metrics: metrics.jsonl, TensorBoard events and the loss-curve PNG."""

from __future__ import annotations

import json
import os

import numpy as np


class MetricsLog:
    """metrics.jsonl + TensorBoard events + loss.png in the workdir (process 0 only).

    On resume from step s, records after s (written by the interrupted run) are dropped, so the
    file always reads as one uninterrupted run.
    """

    def __init__(self, workdir: str, start_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.plot_path = os.path.join(workdir, "loss.png")
        self.records: list[dict] = []
        self._writer = None
        if not enabled:
            return
        self.records = [r for r in read_metrics(self.path) if r["step"] <= start_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")
        try:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(
                os.path.join(workdir, "tensorboard"), purge_step=start_step + 1
            )
        except ImportError:  # reported by `train` through `has_tensorboard`
            self._writer = None

    @property
    def has_tensorboard(self) -> bool:
        return self._writer is not None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self._writer.add_scalar(f"train/{key}", value, record["step"])

    def plot(self) -> str | None:
        """Writes loss.png (loss per step and a moving average); returns its path."""
        if not self.enabled or not self.records:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None

        steps = np.array([r["step"] for r in self.records])
        losses = np.array([r["loss"] for r in self.records], dtype=np.float64)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
        window = max(1, len(losses) // 20)
        if window > 1:
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1 :], smooth, lw=1.8, label=f"mean of {window}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.plot_path, dpi=100)
        plt.close(fig)
        return self.plot_path

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl (empty if missing)."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
