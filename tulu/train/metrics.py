"""Where training metrics go: stdout, ``<run_dir>/metrics.jsonl``, TensorBoard, a loss plot.

Only the writing rank (global rank 0) creates a :class:`MetricsLog`. Every record has ``step``
(optimizer steps completed) and ``kind`` (``train`` or ``eval``). On resume the file is cut back
to the checkpoint's step, so a run that crashed after its last checkpoint does not list the
replayed steps twice and two runs with the same seed can be compared line by line.
TensorBoard (``<run_dir>/tensorboard``) is written when the ``tensorboard`` package imports, by
its writer thread: events queue up (up to :data:`TB_QUEUE`) and reach the file every
:data:`TB_FLUSH_S` seconds and at :meth:`MetricsLog.close`. (Flushing after every record made the
step wait for the thread to write its ~40 events: ~1 ms of each 65 ms RL step on 2 cores.) A
record is one event holding all its scalars, the tags and steps ``add_scalar`` would give: one
event per scalar cost ~1.3 ms per 33-key RL record (a queue hand-off and a file record each,
under the GIL the training's Python needs), one event ~0.2 ms.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from tulu.atomic import atomic_path, write_text_atomic


METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"
TB_QUEUE = 4096
TB_FLUSH_S = 5


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]


class MetricsLog:
    def __init__(self, run_dir: str | Path, log: Callable[[str], None] = print, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.log = log
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.tb = None
            else:
                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), max_queue=TB_QUEUE,
                                        flush_secs=TB_FLUSH_S)

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written by an attempt that died after its last checkpoint)."""
        if not self.path.exists():
            return
        keep = [r for r in read_metrics(self.run_dir) if r["step"] <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, kind: str, step: int, values: dict[str, float]) -> None:
        record = {"kind": kind, "step": step, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        shown = " ".join(f"{k} {_fmt(v)}" for k, v in values.items())
        self.log(f"{kind} step {step}: {shown}")
        if self.tb is not None:
            self._write_tensorboard(kind, step, values)

    def _write_tensorboard(self, kind: str, step: int, values: dict[str, float]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        scalars = [Summary.Value(tag=f"{kind}/{k}", simple_value=float(v)) for k, v in values.items()
                   if isinstance(v, (int, float))]
        if scalars:
            self.tb._get_file_writer().add_summary(Summary(value=scalars), step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def draw_loss(ax, run_dir: str | Path) -> bool:
    """Train loss per step and held-out loss at each eval on a matplotlib ``ax`` (also a panel of
    the pipeline's figure); False when the run logged no loss."""
    train = [r for r in read_metrics(run_dir, "train") if "loss" in r]
    evals = [r for r in read_metrics(run_dir, "eval") if "loss" in r]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return bool(train or evals)


def plot_loss_curve(run_dir: str | Path, title: str = "") -> Path | None:
    """``<run_dir>/loss_curve.png``: train loss per step and held-out loss at each eval.
    Returns None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    draw_loss(ax, run_dir)
    ax.set_title(title)
    out = Path(run_dir) / PLOT_FILE
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return out
