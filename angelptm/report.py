"""`angelptm report`: figures of one or more runs, drawn from their metrics.jsonl and config.yaml.

Panels: loss and validation loss (skipped steps marked), learning rate, gradient norm, tokens/s,
MFU, memory per tier and skipped steps, against the optimizer step. Several runs are overlaid, one
colour each, labelled with the config keys in which they differ. A `.png` is one grid of panels;
an `.html` page is self-contained: a table of the runs and each panel as an embedded PNG. A run
still being written can be reported: a last line cut short is left out.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from angelptm.errors import UserError

MAX_LEGEND_KEYS = 4  # config differences named per run; more are counted


@dataclass
class Run:
    folder: Path
    records: list[dict[str, Any]]
    config: dict[str, Any]  # dotted key -> value, from config.yaml

    @property
    def status(self) -> str:
        """`step N/M`: the last logged step of train.steps (still running, or stopped, when N < M)."""
        last = self.records[-1]["step"] if self.records else 0
        total = self.config.get("train.steps")
        return f"step {last}" if total is None else f"step {last}/{total}"


@dataclass
class Series:
    label: str  # what the line is within its panel, e.g. "validation"
    values: Callable[[list[dict[str, Any]]], tuple[list[int], list[float]]]  # records -> (steps, values)


@dataclass
class Panel:
    title: str
    ylabel: str
    series: list[Series]
    log_y: bool = False  # when the values span more than a factor of 20
    integer_y: bool = False
    mark_skipped: bool = False  # a faint band at each skipped step


def _field(name: str, scale: float = 1.0) -> Callable:
    def values(records):
        kept = [r for r in records if isinstance(r.get(name), (int, float))]
        return [r["step"] for r in kept], [r[name] * scale for r in kept]
    return values


def _skipped_so_far(records):
    count, steps, totals = 0, [], []
    for r in records:
        if "skipped" in r:
            count += bool(r["skipped"])
            steps.append(r["step"])
            totals.append(count)
    return steps, totals


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return {k.rstrip("."): v for k, v in flat.items()}


def read_run(folder: Path) -> Run:
    """A run's logged records (in step order) and flattened config; a line cut short is skipped."""
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{folder} is not a run: it has no metrics.jsonl; pass a run's train.output_dir")
    records = []
    for line in metrics.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # the line being written when the file was read
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    config_file = folder / "config.yaml"
    config = _flatten(yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else {}
    return Run(folder, sorted(records, key=lambda r: r["step"]), config)


def config_differences(runs: list[Run]) -> list[str]:
    """The dotted config keys whose values are not the same in every run (the output folder aside)."""
    keys = sorted(set().union(*(run.config for run in runs)) - {"train.output_dir"})
    return [k for k in keys if len({json.dumps(run.config.get(k), sort_keys=True) for run in runs}) > 1]


def run_labels(runs: list[Run]) -> list[str]:
    differing = config_differences(runs)
    labels = []
    for run in runs:
        shown = [f"{k}={run.config.get(k)}" for k in differing[:MAX_LEGEND_KEYS]]
        if len(differing) > MAX_LEGEND_KEYS:
            shown.append(f"+{len(differing) - MAX_LEGEND_KEYS} more")
        labels.append(f"{run.folder.name} ({run.status})" + (": " + ", ".join(shown) if shown else ""))
    return labels


def panels_for(runs: list[Run]) -> list[Panel]:
    """The panels at least one run has values for; memory shows every `mem_*` field logged."""
    memory = sorted({k for run in runs for r in run.records for k in r if k.startswith("mem_") and k.endswith("_gb")})
    candidates = [
        Panel("Loss", "cross-entropy (nats/token)",
              [Series("train", _field("loss")), Series("validation", _field("val_loss"))], mark_skipped=True),
        Panel("Learning rate", "learning rate", [Series("lr", _field("lr"))]),
        Panel("Gradient norm", "L2 norm before clipping", [Series("grad norm", _field("grad_norm"))], log_y=True),
        Panel("Throughput", "tokens/s", [Series("tokens/s", _field("tokens_per_sec"))]),
        Panel("MFU", "MFU (% of peak FLOP/s)", [Series("MFU", _field("mfu", 100))]),
        Panel("Memory per tier", "GB", [Series(k[len("mem_"):-len("_gb")].replace("_", " "), _field(k))
                                        for k in memory]),
        Panel("Skipped steps", "skipped steps so far (logged)", [Series("skipped", _skipped_so_far)],
              integer_y=True),
    ]
    return [p for p in candidates if any(s.values(run.records)[0] for s in p.series for run in runs)]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("angelptm report draws with matplotlib, which is not installed; "
                        "pip install angelptm[report]") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _style(series_index: int) -> str:
    return ["-", "--", ":", "-."][series_index % 4]


def draw(panels: list[Panel], runs: list[Run], columns: int):
    """A figure of `panels` in a grid, every run in its colour, a panel's series in line styles."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.4 * columns, 3.6 * rows + 0.4 + 0.25 * len(runs)),
                             squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes.flat, panels):
        drawn, shown = [], []  # the panel's series that have values, for its legend
        for j, series in enumerate(panel.series):
            for i, run in enumerate(runs):
                steps, values = series.values(run.records)
                marker = "o" if len(steps) < 3 or series.label == "validation" else None
                ax.plot(steps, values, linestyle=_style(j), marker=marker, markersize=3,
                        color=colours[i % len(colours)])
                shown += values
                if steps and j not in drawn:
                    drawn.append(j)
        # The legend says which line is which series (in black, whatever the run's colour).
        handles = [plt.Line2D([], [], color="black", linestyle=_style(j)) for j in drawn] if len(drawn) > 1 else []
        names = [panel.series[j].label for j in drawn] if len(drawn) > 1 else []
        skipped = [(i, r["step"]) for i, run in enumerate(runs) for r in run.records if r.get("skipped")]
        if panel.mark_skipped and skipped:
            for i, step in skipped:
                ax.axvline(step, color=colours[i % len(colours)], alpha=0.3, linewidth=4)
            handles.append(plt.Line2D([], [], color="grey", alpha=0.3, linewidth=4))
            names.append("skipped step")
        if handles:
            ax.legend(handles, names, fontsize=8, loc="best")
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        positive = [v for v in shown if v > 0]
        if panel.log_y and positive and max(positive) > 20 * min(positive):  # spikes that would flatten the rest
            ax.set_yscale("log")
        if panel.integer_y:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylim(0, max([1, *shown]) * 1.1)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], color=colours[i % len(colours)], linewidth=3) for i in range(len(runs))]
    fig.legend(handles, run_labels(runs), loc="upper center", ncol=1, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.35 + 0.25 * len(runs)) / fig.get_figheight()))
    return fig


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    _pyplot().close(fig)
    return buffer.getvalue()


def _html_page(runs: list[Run], panels: list[Panel]) -> str:
    differing = config_differences(runs)
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["run", "status", "last loss", *differing])
    rows = []
    for run in runs:
        last_loss = next((f"{r['loss']:.4f}" for r in reversed(run.records) if "loss" in r), "")
        cells = [str(run.folder), run.status, last_loss, *(str(run.config.get(k)) for k in differing)]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    images = "".join(
        f'<img alt="{html.escape(p.title)}" src="data:image/png;base64,'
        f'{base64.b64encode(_png(draw([p], runs, 1))).decode()}">' for p in panels)
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>angelptm report</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}img{max-width:48%;margin:4px}"
            f"</style></head><body><h1>angelptm report</h1><table><tr>{head}</tr>{''.join(rows)}</table>"
            f"<div>{images}</div></body></html>\n")


def report(folders: list[Path], out: Optional[Path] = None) -> Path:
    """Draw the runs in `folders` into `out` (.png or .html; default `<first folder>/report.png`)."""
    out = out or folders[0] / "report.png"
    if out.suffix not in (".png", ".html"):
        raise UserError(f"--out {out} must end in .png (one figure) or .html (a page of figures)")
    runs = [read_run(folder) for folder in folders]
    if not any(run.records for run in runs):
        raise UserError(f"no step is logged yet in {', '.join(map(str, folders))}; report once the first "
                        "step is logged (train.log_every)")
    panels = panels_for(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        out.write_bytes(_png(draw(panels, runs, columns=2)))
    else:
        out.write_text(_html_page(runs, panels))
    return out
