"""Draw a run's curves to a PNG: loss (and validation loss), logit scale (and bias), learning rate, throughput,
zero-shot and validation retrieval results.

    clipalign-plot runs/quickstart                       # writes runs/quickstart/curves.png
    clipalign-plot runs/a runs/b --out compare.png       # several runs on the same axes
    python tools/plot.py runs/quickstart --x samples

Reads each run directory's `metrics.jsonl` (a metrics line per `train.log_every` steps, zero-shot lines and
validation lines, `{"step": S, "val": {...}}`; file names in `clipalign.layout`). The validation loss is drawn in the
training loss's panel, its retrieval recall in a panel of its own. Needs matplotlib (`pip install "clipalign[plot]"`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clipalign.layout import CURVES_FILE, METRICS_FILE, atomic_path

# (metrics key, panel title); a panel is drawn when some run logged the key
TRAIN_PANELS = [
    ("loss", "training loss (mean over processes)"),
    ("logit_scale", "logit scale"),
    ("logit_bias", "logit bias"),
    ("lr", "learning rate"),
    ("samples_per_s", "samples/s (all processes)"),
    ("mfu", "MFU"),
]


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """A run's training lines and zero-shot lines from RUN/metrics.jsonl (validation lines: `read_val`).

    Raises:
        FileNotFoundError: naming the file, when the run has none.
        ValueError: naming the file and line, when a line is not JSON.
    """
    train, zeroshot, _ = _read_lines(run_dir)
    return train, zeroshot


def read_val(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """A run's validation results (`data.val`) as series: metric (`loss`, `image_retrieval_recall@1`, ...) ->
    [(step, value)], in the order they were logged. Raises as `read_metrics`."""
    return val_series(_read_lines(run_dir)[2])


# what a validation line holds besides its curves
_VAL_NOT_CURVES = ("samples", "batches", "global_batch", "seconds")


def val_series(lines: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] of validation lines (`{"step": S, "val": {...}}`)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in lines:
        for key, value in line["val"].items():
            if isinstance(value, (int, float)) and key not in _VAL_NOT_CURVES:
                series.setdefault(key, []).append((line["step"], float(value)))
    return series


def _read_lines(run_dir: str | Path) -> tuple[list[dict], list[dict], list[dict]]:
    """RUN/metrics.jsonl's training, evaluation and validation lines."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such metrics file; pass a run directory (train.output_dir)")
    train, zeroshot, val = [], [], []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            # a run killed while appending leaves a partial last line; anything else is damage worth naming
            if number == len(lines):
                continue
            raise ValueError(f"{path}:{number}: not a JSON line ({e.msg})") from None
        if "zeroshot" in record or "retrieval" in record:
            zeroshot.append(record)
        elif isinstance(record.get("val"), dict):
            val.append(record)
        else:
            train.append(record)
    return _last_per_step(train), _last_per_step(zeroshot), _last_per_step(val)


def _last_per_step(records: list[dict]) -> list[dict]:
    """One record per step, the last logged, in step order: a run resumed after a kill trains (and logs) again the
    steps after its checkpoint, and those later records are the run's."""
    by_step = {record.get("step"): record for record in records}
    return sorted(by_step.values(), key=lambda record: record.get("step", 0))


_NOT_CURVES = ("num_images", "num_classes", "num_texts")
_EVAL_KINDS = {"zeroshot": "zero-shot classification", "retrieval": "zero-shot retrieval"}
VAL_RETRIEVAL_TITLE = "validation retrieval (data.val)"


def _zeroshot_series(lines: list[dict], val: list[dict] = ()) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """evaluation panel -> metric -> [(step, value)]; metrics ending in "chance" are chance levels. The recall of
    validation lines (`val`) makes a panel of its own."""
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for line in lines:
        for kind, title in _EVAL_KINDS.items():
            for key, value in line.get(kind, {}).items():
                if isinstance(value, (int, float)) and key not in _NOT_CURVES:
                    series.setdefault(title, {}).setdefault(key, []).append((line["step"], float(value)))
    for key, points in val_series(list(val)).items():
        if "retrieval" in key:
            series.setdefault(VAL_RETRIEVAL_TITLE, {})[key] = points
    return series


def _samples_at(step: int, train: list[dict]) -> float:
    """Samples seen at `step`, from the training lines (a validation line logs only its step)."""
    known = [(r["step"], r["samples"]) for r in train if "samples" in r and r["step"] > 0]
    exact = [samples for s, samples in known if s == step]
    if exact:
        return exact[-1]
    before = [(s, samples) for s, samples in known if s <= step] or known
    if not before:
        return float(step)
    s, samples = before[-1]
    return samples / s * step


def pyplot(what: str = "clipalign-plot"):
    """matplotlib.pyplot drawing to files only; a clear message naming `what` needs it when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(f'{what} needs matplotlib: pip install "clipalign[plot]"') from None
    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write `fig` as a PNG at `path` (creating its folder) and close it."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")  # the format by name: the temporary name has no .png suffix
    finally:
        pyplot().close(fig)
    return path


def plot_runs(run_dirs: list[str | Path], out: str | Path, x: str = "step") -> Path:
    """Draw the curves of one or more runs into one PNG at `out`; returns its path."""
    plt = pyplot()
    runs = {str(d): _read_lines(d) for d in run_dirs}
    panels = [(key, title) for key, title in TRAIN_PANELS
              if any(key in r for train, _, _ in runs.values() for r in train)
              or key == "loss" and any(val for _, _, val in runs.values())]
    zeroshot = {name: _zeroshot_series(zs, val) for name, (_, zs, val) in runs.items()}
    eval_sets = sorted({s for series in zeroshot.values() for s in series})
    if not panels and not eval_sets:
        raise ValueError(f"no metrics to plot in {', '.join(runs)}: the runs logged no steps yet")
    count = len(panels) + len(eval_sets)
    cols = 2 if count > 1 else 1
    rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    axes_left = iter(axes.flat)
    for key, title in panels:
        ax = next(axes_left)
        validated = key == "loss" and any(val for _, _, val in runs.values())
        for name, (train, _, val) in runs.items():
            points = [(r.get(x, r["step"]), r[key]) for r in train if key in r]
            if points:
                ax.plot(*zip(*points), label=_label(name, runs) + ("train" if validated else ""))
            if key == "loss" and val:  # the validation loss beside the training loss, on the same x axis
                losses = val_series(val).get("loss", [])
                ax.plot([_samples_at(s, train) if x == "samples" else s for s, _ in losses],
                        [v for _, v in losses], marker="o", label=f"{_label(name, runs)}val")
        if validated:
            title = "loss (training: mean over processes; val: data.val)"
        ax.set(title=title, xlabel=x, yscale="log" if key == "loss" else "linear")
        _finish(ax, legend=len(runs) > 1 or validated)
    for set_name in eval_sets:  # one panel per eval set: every metric of every run, chance as a dashed line
        ax = next(axes_left)
        for name, series in zeroshot.items():
            for metric, points in series.get(set_name, {}).items():
                if metric.endswith("chance"):
                    ax.axhline(points[-1][1], linestyle="--", color="grey", label=metric.replace("_", " "))
                else:
                    ax.plot(*zip(*points), marker="o", label=f"{_label(name, runs)}{metric}")
        ax.set(title=set_name, xlabel="step", ylim=(0, 1.02))
        _finish(ax, legend=True)
    for ax in axes_left:
        ax.set_visible(False)
    fig.tight_layout()
    return save_figure(fig, out)


def _label(name: str, runs: dict) -> str:
    """The run's directory name as a legend prefix, when there are several runs."""
    return f"{Path(name).name or name}: " if len(runs) > 1 else ""


def _finish(ax, legend: bool) -> None:
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help=f"run directories (each with a {METRICS_FILE})")
    p.add_argument("--out", help=f"PNG to write; default RUN/{CURVES_FILE} for one run, {CURVES_FILE} for several")
    p.add_argument("--x", choices=["step", "samples"], default="step", help="x axis of the training panels")
    args = p.parse_args(argv)
    out = args.out or (Path(args.runs[0]) / CURVES_FILE if len(args.runs) == 1 else Path(CURVES_FILE))
    try:
        path = plot_runs(args.runs, out, x=args.x)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(path)


if __name__ == "__main__":
    main()
