"""One figure for a whole pipeline run: each stage's training curve and held-out accuracy.

Panels, each only when its data exists (a stage that did not run, or logged nothing, is left out):
SFT loss; DPO loss with reward accuracy and margin; RLVR mean reward with the verified rate per
task (trailing means over a tenth of the run; the raw reward faintly behind); held-out accuracy
per stage and task (grouped bars, from :mod:`tulu.pipeline.report`).
Curves come from ``<run_dir>/metrics.jsonl`` (:mod:`tulu.train.metrics`).
"""

from __future__ import annotations

from pathlib import Path

from tulu.atomic import atomic_path
from tulu.train.metrics import draw_loss, read_metrics


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pts], [v for _, v in pts]


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points (fewer at the start): an RL step sees a few dozen
    samples, so per-step rates swing by tens of points and hide the trend."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _sft_panel(ax, run_dir: Path) -> None:
    draw_loss(ax, run_dir)
    ax.set_title("SFT loss")


def _dpo_panel(ax, run_dir: Path) -> None:
    draw_loss(ax, run_dir)
    ax.set_title("DPO loss")
    train = read_metrics(run_dir, "train")
    twin, lines = None, []
    for key, style in (("accuracy", "-"), ("margin", "--")):
        steps, values = _series(train, key)
        if steps:
            twin = twin or ax.twinx()
            lines += twin.plot(steps, values, style, lw=1, color="tab:green" if key == "accuracy" else "tab:red",
                               label=f"train reward {key}")
    if twin is not None:
        twin.set_ylabel("reward accuracy / margin")
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles + lines, labels + [ln.get_label() for ln in lines], fontsize=8)


def _rlvr_panel(ax, run_dir: Path) -> None:
    train = read_metrics(run_dir, "train")
    reward_steps, reward = _series(train, "reward_mean")
    verified_keys = sorted({k for r in train for k in r if k.startswith("verified_")})
    ax.set_title("RLVR")
    ax.set_xlabel("step")
    window = max(1, len(reward_steps) // 10)
    avg = f" ({window}-step mean)" if window > 1 else ""
    lines = []
    if reward_steps:
        ax.plot(reward_steps, reward, lw=0.6, color="black", alpha=0.25)
        lines += ax.plot(reward_steps, _smooth(reward, window), lw=1.5, color="black", label="mean reward" + avg)
        ax.set_ylabel("mean reward")
    if verified_keys:
        twin = ax.twinx() if reward_steps else ax
        for key in verified_keys:
            steps, values = _series(train, key)
            lines += twin.plot(steps, _smooth(values, window), lw=1.2,
                               label=f"verified rate {key.removeprefix('verified_')}" + avg)
        twin.set_ylabel("verified rate")
        twin.set_ylim(0, 1)
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8)
    ax.grid(alpha=0.3)


def _accuracy_panel(ax, results: dict[str, dict]) -> None:
    results = {stage: res for stage, res in results.items() if res}
    tasks = sorted({t for res in results.values() for t in res.get("per_task", {})}) + ["all"]
    width = 0.8 / len(results)
    for i, (stage, res) in enumerate(results.items()):
        values = [res.get("per_task", {}).get(t, {}).get("accuracy", 0.0) if t != "all" else res["accuracy"]
                  for t in tasks]
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(tasks))]
        bars = ax.bar(xs, values, width, label=stage)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out verified accuracy")
    ax.set_title("Held-out accuracy per stage")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")


def _has_curves(run_dir: Path) -> bool:
    return any("loss" in r or "reward_mean" in r or any(k.startswith("verified_") for k in r)
               for r in read_metrics(run_dir))


def plot_pipeline(stage_run_dirs: dict[str, Path], results: dict[str, dict], out_png: str | Path) -> Path | None:
    """Write the figure to ``out_png`` (atomically) and return it; None when matplotlib is
    missing (it comes with the ``metrics`` extra, which ``scripts/setup.sh`` installs).

    ``stage_run_dirs`` maps ``"sft"``, ``"dpo"``, ``"rlvr"`` to their run folders (other keys
    are ignored); ``results`` maps stage names to :func:`tulu.pipeline.report.evaluate_model`
    results. With nothing to draw, the figure says so.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    drawers = [(_sft_panel, stage_run_dirs.get("sft")), (_dpo_panel, stage_run_dirs.get("dpo")),
               (_rlvr_panel, stage_run_dirs.get("rlvr"))]
    panels = [(draw, Path(d)) for draw, d in drawers if d is not None and _has_curves(Path(d))]
    if any(results.values()):
        panels.append((_accuracy_panel, results))
    cols = min(2, max(1, len(panels)))
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, (draw, arg) in zip(flat, panels):
        draw(ax, arg)
    for ax in flat[len(panels):]:
        fig.delaxes(ax)
    if not panels:
        fig.text(0.5, 0.5, "no training metrics and no held-out results", ha="center", va="center")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=100, format=out.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return out
