"""`exaone-plot`: figures of a training run, drawn from its metrics.jsonl.

exaone-plot RUN_DIR [--out DIR]

Writes one PNG per figure into RUN_DIR/plots/ (or DIR): loss.png (loss, LM and MTP loss; the
router's auxiliary loss below), lr.png, grad_norm.png, throughput.png (tokens/s; MFU when measured),
eval.png (loss and bits per byte per eval dataset; needle-in-a-haystack accuracy) and
expert_imbalance.png (max/mean tokens per expert of each MoE layer over the steps). A figure without
data is skipped. Dashed vertical lines mark where the curriculum enters a new stage.
Needs matplotlib: pip install 'megatron-exaone[plot]'.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_exaone.errors import UserError, reported

if TYPE_CHECKING:  # imported where drawn: `--help` and the error messages stay fast
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    Drawn = tuple[Figure, list[Axes]]

PROGRAM = "exaone-plot"
INSTALL_HINT = "pip install 'megatron-exaone[plot]'"
LOSS_KEYS = ("loss", "lm_loss", "mtp_loss")
PANEL_HEIGHT = 2.8
WIDTH = 10.0
MAX_COLUMNS = 1500
LAYER_NUMBER = re.compile(r"layers\.(\d+)")


class PlotError(UserError, ValueError):
    """A run directory or metrics file that cannot be plotted."""


@dataclass
class Metrics:
    """A run's metrics.jsonl as it stands after its last resume: records sorted by step, one per
    step."""

    steps: list[dict[str, Any]] = field(default_factory=list)  # training step records
    evals: list[dict[str, Any]] = field(default_factory=list)  # eval records ("eval/..." keys)
    # records cut short by a kill, and a malformed last line (a write in progress)
    ignored_lines: list[int] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ reading
def read_metrics(path: str | os.PathLike) -> Metrics:
    """Parse a metrics.jsonl. A resumed run repeats the steps from its checkpoint on: the later
    records win (eval records of one step are merged). A record cut short by a kill is skipped
    (the logger starts a fresh line after it on resume, so it may sit mid-file); any other
    malformed line is an error, unless it is the last (a write in progress)."""
    path = Path(path)
    metrics = Metrics()
    pending: tuple[int, str] | None = None  # a bad line: fatal unless nothing follows it
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if pending is not None:
                raise PlotError(
                    f"{path}:{pending[0]}: not a metrics record ({pending[1]}); "
                    "repair or delete that line"
                )
            record, problem = _parse(line)
            if record is not None:
                _add(metrics, record)
            elif _cut_short(line):
                metrics.ignored_lines.append(lineno)
            else:
                pending = (lineno, problem)
    if pending is not None:
        metrics.ignored_lines.append(pending[0])
    return metrics


def _parse(line: str) -> tuple[dict[str, Any] | None, str]:
    """The record on `line`, or None and what is wrong with it."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON: {exc.msg} at column {exc.colno}"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return None, 'no integer "step"'
    return record, ""


def _cut_short(line: str) -> bool:
    # the logger writes a whole object then a newline: an unclosed object is an interrupted write
    text = line.strip()
    return text.startswith("{") and not text.endswith("}")


def _add(metrics: Metrics, record: dict[str, Any]) -> None:
    step = record["step"]
    if "loss" in record:
        # A step at or before one already seen: a resume from a checkpoint, and the records of the
        # abandoned timeline from there on are stale (evals at `step` itself may precede it).
        _drop_from(metrics.steps, step)
        _drop_from(metrics.evals, step + 1)
        metrics.steps.append(record)
    elif any(key.startswith("eval/") for key in record):
        _drop_from(metrics.evals, step + 1)
        if metrics.evals and metrics.evals[-1]["step"] == step:
            # a relaunch re-checks a failed stage gate with a NIAH-only eval at the same step: add
            # to the stage-end record (the later value of a metric wins)
            record = {**metrics.evals.pop(), **record}
        metrics.evals.append(record)


def _drop_from(records: list[dict[str, Any]], step: int) -> None:
    while records and records[-1]["step"] >= step:
        records.pop()


def _metrics_file(run_dir: Path) -> Path:
    if not run_dir.exists():
        raise PlotError(f"{run_dir}: no such run directory")
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir}: not a directory; give the run directory (run_dir=...)")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(
            f"{run_dir}: no metrics.jsonl (training writes it every trainer.log_interval steps)"
        )
    return path


def read_run(run_dir: str | os.PathLike) -> Metrics:
    """RUN_DIR/metrics.jsonl, with at least one training step record."""
    path = _metrics_file(Path(run_dir))
    metrics = read_metrics(path)
    if not metrics.steps:
        raise PlotError(f"{path}: no training step records yet (nothing to plot)")
    return metrics


# ------------------------------------------------------------------------------------------ drawing
def _number(value: Any) -> float:
    # None (not measured), NaN and inf (a skipped step) all leave a gap in a line
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return math.nan


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]] | None:
    """(steps, values) of `key`; None when it has no finite value."""
    values = [_number(r.get(key)) for r in records]
    if all(math.isnan(v) for v in values):
        return None
    return [r["step"] for r in records], values


def stage_boundaries(steps: list[dict[str, Any]]) -> list[tuple[float, str]]:
    """(x, new stage's name) wherever `stage` changes between consecutive step records. The last
    step of a stage is always logged, so the new stage starts right after the earlier record."""
    return [
        (prev["step"] + 0.5, str(cur.get("stage_name", cur.get("stage"))))
        for prev, cur in zip(steps, steps[1:])
        if cur.get("stage") != prev.get("stage")
    ]


def _new_figure(panels: int, title: str, height: float = PANEL_HEIGHT) -> Drawn:
    # a bare Figure renders PNGs with Agg and leaves pyplot's global state (and backend) alone
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(WIDTH, 0.6 + height * panels), layout="constrained")
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0].tolist()
    fig.suptitle(title)
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 2.5 on a short run
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _mark_stages(axes: list[Axes], boundaries: list[tuple[float, str]]) -> None:
    for x, name in boundaries:
        for ax in axes:
            ax.axvline(x, color="gray", linestyle="--", linewidth=1)
        axes[0].text(
            x,
            0.98,
            name,
            transform=axes[0].get_xaxis_transform(),
            rotation=90,
            ha="right",
            va="top",
            fontsize=8,
            # readable over a curve or the heatmap
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 1},
        )


def _lines(ax: Axes, records: list[dict[str, Any]], keys: dict[str, str], **style: Any) -> None:
    """Draw each key (-> legend label) that has data."""
    for key, label in keys.items():
        series = _series(records, key)
        if series is not None:
            ax.plot(*series, label=label, **style)
    ax.legend(fontsize=8)


def _loss_figure(m: Metrics, title: str) -> Drawn | None:
    if not any(_series(m.steps, key) for key in LOSS_KEYS):
        return None
    aux = _series(m.steps, "aux_loss")
    fig, axes = _new_figure(2 if aux else 1, f"{title}: loss")
    _lines(axes[0], m.steps, {key: key for key in LOSS_KEYS}, linewidth=1)
    axes[0].set_ylabel("loss")
    if aux:  # ~1e-4: invisible on the loss axis
        axes[1].plot(*aux, linewidth=1, color="tab:red")
        axes[1].set_ylabel("aux loss")
    return fig, axes


def _single_figure(key: str, label: str) -> Callable[[Metrics, str], Drawn | None]:
    def draw(m: Metrics, title: str) -> Drawn | None:
        series = _series(m.steps, key)
        if series is None:
            return None
        fig, axes = _new_figure(1, f"{title}: {label}")
        axes[0].plot(*series, linewidth=1)
        axes[0].set_ylabel(label)
        return fig, axes

    return draw


def _throughput_figure(m: Metrics, title: str) -> Drawn | None:
    rate = _series(m.steps, "tokens_per_s")
    if rate is None:
        return None
    mfu = _series(m.steps, "mfu")
    fig, axes = _new_figure(2 if mfu else 1, f"{title}: throughput")
    axes[0].plot(*rate, linewidth=1)
    axes[0].set_ylabel("tokens/s")
    if mfu:
        axes[1].plot(mfu[0], [100 * v for v in mfu[1]], linewidth=1, color="tab:green")
        axes[1].set_ylabel("MFU (%)")
    return fig, axes


def _eval_panels(evals: list[dict[str, Any]]) -> list[tuple[str, dict[str, str]]]:
    """(y label, {key: legend label}) of each eval panel that has data; ppl is exp(loss)."""
    datasets = sorted(
        {key.split("/")[1] for r in evals for key in r if re.fullmatch(r"eval/[^/]+/loss", key)}
    )
    panels = [
        (label, {f"eval/{name}/{metric}": name for name in datasets})
        for metric, label in (("loss", "eval loss"), ("bpb", "bits per byte"))
    ]
    panels.append(("NIAH accuracy", {"eval/niah/acc": "niah"}))
    return [(label, keys) for label, keys in panels if any(_series(evals, k) for k in keys)]


def _eval_figure(m: Metrics, title: str) -> Drawn | None:
    panels = _eval_panels(m.evals)
    if not panels:
        return None
    fig, axes = _new_figure(len(panels), f"{title}: evaluation")
    for ax, (label, keys) in zip(axes, panels):
        # a handful of points: markers keep a single eval visible
        _lines(ax, m.evals, keys, marker="o", markersize=3, linewidth=1)
        ax.set_ylabel(label)
    return fig, axes


def _layer_order(name: str) -> tuple[float, str]:
    number = LAYER_NUMBER.search(name)
    return (int(number.group(1)) if number else math.inf, name)


def _layer_label(name: str) -> str:
    number = LAYER_NUMBER.search(name)
    return f"layer {number.group(1)}" if number else name


def _column_edges(steps: list[int]) -> list[float]:
    # steps are logged at uneven intervals: each column reaches halfway to its neighbours
    if len(steps) == 1:
        return [steps[0] - 0.5, steps[0] + 0.5]
    mids = [(a + b) / 2 for a, b in zip(steps, steps[1:])]
    return [2 * steps[0] - mids[0], *mids, 2 * steps[-1] - mids[-1]]


def _fewer_columns(grid: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most MAX_COLUMNS columns (about the PNG's width in pixels: more only cost time), each the
    highest value of its consecutive steps so that a spike stays visible."""
    import numpy as np

    count = grid.shape[1]
    if count <= MAX_COLUMNS:
        return grid, edges
    starts = np.unique(np.linspace(0, count, MAX_COLUMNS, endpoint=False).astype(int))
    # fmax skips NaN (a step without statistics) unless the whole column is NaN
    return np.fmax.reduceat(grid, starts, axis=1), np.append(edges[starts], edges[-1])


def _expert_figure(m: Metrics, title: str) -> Drawn | None:
    layers = sorted(
        {name for r in m.steps for name in (r.get("expert_imbalance") or {})}, key=_layer_order
    )
    if not layers:
        return None
    import numpy as np

    # a skipped step (or a dense record) has no statistics: NaN, drawn as a blank cell
    grid = np.array(
        [[_number((r.get("expert_imbalance") or {}).get(n)) for r in m.steps] for n in layers]
    )
    grid, edges = _fewer_columns(grid, np.array(_column_edges([r["step"] for r in m.steps])))
    fig, axes = _new_figure(1, f"{title}: expert load imbalance", height=1.5 + 0.18 * len(layers))
    ax = axes[0]
    ax.grid(False)
    mesh = ax.pcolormesh(
        edges,
        np.arange(len(layers) + 1) - 0.5,
        np.ma.masked_invalid(grid),
        cmap="viridis",
        shading="flat",
        vmin=1.0,  # perfect balance
    )
    every = max(1, math.ceil(len(layers) / 32))  # readable labels on a deep model
    ax.set_yticks(range(0, len(layers), every), [_layer_label(n) for n in layers[::every]])
    ax.invert_yaxis()
    ax.set_ylabel("MoE layer")
    fig.colorbar(mesh, ax=ax, label="max / mean tokens per expert")
    return fig, axes


FIGURES: tuple[tuple[str, Callable[[Metrics, str], Drawn | None], str], ...] = (
    ("loss.png", _loss_figure, "no loss values"),
    ("lr.png", _single_figure("lr", "learning rate"), "no learning rate values"),
    ("grad_norm.png", _single_figure("grad_norm", "gradient norm"), "no gradient norms"),
    ("throughput.png", _throughput_figure, "no tokens_per_s values"),
    ("eval.png", _eval_figure, "no eval records with a loss, bpb or NIAH accuracy"),
    ("expert_imbalance.png", _expert_figure, "no expert load statistics (a dense model?)"),
)


# ------------------------------------------------------------------------------------------ writing
def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotError(f"matplotlib is not installed; install the extra: {INSTALL_HINT}") from None


def _save(fig: Figure, path: Path) -> None:
    # whole or nothing: a reader (or a dashboard refreshing it) never sees half a PNG
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    except OSError as exc:
        raise PlotError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def plot_metrics(metrics: Metrics, out_dir: str | os.PathLike, title: str) -> list[Path]:
    """Draw every figure that has data into `out_dir`; the files written."""
    _require_matplotlib()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PlotError(f"cannot create {out}: {exc.strerror or exc}") from None
    boundaries = stage_boundaries(metrics.steps)
    written = []
    for name, draw, _ in FIGURES:
        drawn = draw(metrics, title)
        if drawn is None:
            continue
        fig, axes = drawn
        _mark_stages(axes, boundaries)
        _save(fig, out / name)
        written.append(out / name)
    return written


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Figures of RUN_DIR/metrics.jsonl into `out_dir` (default RUN_DIR/plots); the files
    written. Raises PlotError (a UserError) on a missing or damaged metrics file."""
    run_dir = Path(run_dir)
    return plot_metrics(read_run(run_dir), out_dir or run_dir / "plots", run_dir.resolve().name)


# ----------------------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", help="a training run directory (holds metrics.jsonl)")
    parser.add_argument("--out", help="folder for the PNGs (default: RUN_DIR/plots)")
    return parser


def _run(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir)
    metrics = read_run(run_dir)
    for lineno in metrics.ignored_lines:
        print(
            f"{PROGRAM}: note: ignored line {lineno} of {run_dir / 'metrics.jsonl'} "
            "(a record cut short by an interrupted write)",
            file=sys.stderr,
        )
    out = Path(args.out) if args.out else run_dir / "plots"
    written = plot_metrics(metrics, out, run_dir.resolve().name)
    for path in written:
        print(f"wrote {path}")
    for name, _, reason in FIGURES:
        if out / name not in written:
            print(f"skipped {name}: {reason}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with reported(PROGRAM):
            _run(args)
    except SystemExit as exc:
        return int(exc.code)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
