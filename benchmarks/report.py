"""Benchmark figures: one PNG per `benchmarks/results/*.json` that holds ratios, beside the JSON.

    python benchmarks/report.py [--results benchmarks/results]

A ratio is a number, or a {median, min, max} mapping, under a key that says it is one (`ratio`,
`speedup`, `_over_`, `fraction`, or `a / b`): `ratios: {"zerocache-3 / fsdp2": {...}}`,
`results: [{side, ratio_vs_datasets_map}]`, `rows: [{schedule, measured_over_theory}]`. Each key
is a panel of horizontal bars (median, with a min-max whisker where the JSON has one), labelled by
where the ratio sits (the mapping keys, a row's names and integers). Drawn too: the parity line at
1 and the goal from the JSON's `goals` (a goal key names the ratio, e.g. `vs_datasets_map` for
`ratio_vs_datasets_map`). A JSON with no ratio is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RATIO_WORDS = ("ratio", "speedup", "_over_", "fraction", " / ")
STRUCTURE_KEYS = {"rows", "results", "sizes", "runs", "ratios", "measured"}  # containers, not names
Bar = tuple[str, float, Optional[float], Optional[float]]  # label, median, min, max


def _is_ratio_key(key: str) -> bool:
    return any(word in key for word in RATIO_WORDS)


def _row_name(row: dict) -> str:
    """A list item's name: its text fields and integers (`gpipe pp=4 microbatches=8`)."""
    words = [v for v in row.values() if isinstance(v, str)]
    words += [f"{k}={v}" for k, v in row.items() if isinstance(v, int) and not isinstance(v, bool)]
    return " ".join(words)


def _value(node: Any) -> Optional[tuple[float, Optional[float], Optional[float]]]:
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node), None, None
    if isinstance(node, dict) and isinstance(node.get("median"), (int, float)):
        return float(node["median"]), node.get("min"), node.get("max")
    return None


def find_ratios(node: Any, where: tuple[str, ...] = (), group: Optional[str] = None,
                found: Optional[dict[str, list[Bar]]] = None) -> dict[str, list[Bar]]:
    """Panel name -> bars, for every ratio in a benchmark's JSON tree."""
    found = defaultdict(list) if found is None else found
    if isinstance(node, dict):
        for key, child in node.items():
            if (group or _is_ratio_key(key)) and _value(child) is not None:
                if group:  # an entry of a `ratios` mapping, or of a ratio's mapping by side
                    name, label = group, " / ".join([w for w in where if w != group] + [key])
                elif where:  # inside rows or nested mappings: a panel per key, a bar per place
                    name, label = key, " / ".join(where)
                else:  # a top-level number: one panel of them per kind
                    name, label = ("fractions" if "fraction" in key else "ratios"), key
                found[name].append((label, *_value(child)))
            elif isinstance(child, (dict, list)):
                # A `ratios` mapping, or a ratio given per side (`speedup_vs_x: {side: ...}`): one panel of its entries.
                inner = key if key == "ratios" or (group is None and _is_ratio_key(key)) else group
                find_ratios(child, where + (() if key in STRUCTURE_KEYS else (key,)), inner, found)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            name = _row_name(item) if isinstance(item, dict) else ""
            find_ratios(item, where + (name or str(i),), group, found)
    return found


def goal_for(names: list[str], goals: dict) -> Optional[float]:
    """The goal whose key ends one of `names` (a bar's label, then its panel's name)."""
    for name in names:
        for key, goal in goals.items():
            if isinstance(goal, (int, float)) and not isinstance(goal, bool) and name.endswith(key):
                return float(goal)
    return None


def draw(name: str, panels: dict[str, list[Bar]], goals: dict, out: Path) -> None:
    heights = [0.8 + 0.32 * len(bars) for bars in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, sum(heights) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (panel, bars) in zip(axes[:, 0], panels.items()):
        fraction = "fraction" in panel  # drawn in percent, against its goal (no parity line)
        scale = 100.0 if fraction else 1.0
        labels, medians = [b[0] for b in bars], [b[1] * scale for b in bars]
        low = [m - (b[2] * scale if b[2] is not None else m) for m, b in zip(medians, bars)]
        high = [(b[3] * scale if b[3] is not None else m) - m for m, b in zip(medians, bars)]
        ax.barh(range(len(bars)), medians, xerr=[low, high], color="tab:blue", alpha=0.8, capsize=3)
        ax.set_yticks(range(len(bars)), labels, fontsize=8)
        ax.invert_yaxis()  # in the JSON's order, top to bottom
        if not fraction:
            ax.axvline(1.0, color="grey", linewidth=1, linestyle=":", label="1 (parity)")
        goal_shown = False
        for y, (label, m, up) in enumerate(zip(labels, medians, high)):
            goal = goal_for([label, panel], goals)
            if goal is not None:  # the bar's goal, a red mark across it
                ax.vlines(goal * scale, y - 0.45, y + 0.45, color="tab:red", linewidth=2,
                          label=None if goal_shown else f"goal {goal * scale:g}{'%' if fraction else ''}")
                goal_shown = True
            ax.annotate(f"{m:.3g}{'%' if fraction else ''}", (m + up, y), xytext=(4, 0), textcoords="offset points",
                        va="center", fontsize=7)  # the median's value, right of its whisker
        ax.set_xlabel(f"{panel}{' (% of a step)' if fraction else ''}, median; whiskers min-max")
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: bars fill the panel
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(name)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    for path in sorted(args.results.glob("*.json")):
        data = json.loads(path.read_text())
        panels = find_ratios(data)
        if not panels:
            print(f"skipped {path.name}: no ratios in it")
            continue
        goals = data.get("goals", {}) if isinstance(data, dict) else {}
        out = path.with_suffix(".png")
        draw(path.stem, dict(panels), goals, out)
        print(f"wrote {out} ({', '.join(panels)})")


if __name__ == "__main__":
    main()
