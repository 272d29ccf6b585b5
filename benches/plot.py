#!/usr/bin/env python3
"""Plot the mesh benchmark's JSON report as PNG figures.

Usage: python3 benches/plot.py REPORT.json OUTDIR

Input: the JSON report the data-plane benchmark harness writes. Used keys: "systems" (the
order and colour of every system), "rows" (one per measurement: id, label, unit, group,
values, and optionally runs, better, moat_vs_haproxy, target, verdict), "latency_curves"
(per system, a list of {"percentile", "ms"} points), and, for titles only, "mode",
"started_at", "settings" and "host".

Output, in OUTDIR (created if missing); each path is printed as it is written:
  latency.png     latency by percentile per system (HdrHistogram style, "number of nines" axis)
  throughput.png  a bar chart per "throughput" or "connections" row
  cost.png        a bar chart per "cpu" or "memory" row (systems without a value are left out)
Bars show the median over repeats, labelled with its value; dots show each repeat.

Exit status: 0 when written, 2 for an unreadable or malformed report (the message names the
file and key), 3 when matplotlib is not importable, 1 when OUTDIR cannot be written.
"""

from __future__ import annotations

import json
import math
import os
import sys
import textwrap
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MATPLOTLIB_PIN = "3.11.2"  # keep in step with tests/setup.sh
SYSTEM_COLOURS = {"moat": "#1f5fbf", "haproxy": "#e8830c", "direct": "#8c8c8c"}
SPARE_COLOURS = ["#2a9d4b", "#9b3fbf", "#c0392b", "#17a2b8"]
VERDICT_COLOURS = {"met": "#1e7b34", "missed": "#c0392b"}
NINES_TICKS = [(1.0, "0%"), (2.0, "50%"), (10.0, "90%"), (100.0, "99%"), (1e3, "99.9%"),
               (1e4, "99.99%"), (1e5, "99.999%"), (1e6, "99.9999%")]
# What the plots need of the report; a kind ending in "?" may be null or absent.
TOP_KEYS = {"systems": "list", "rows": "list", "latency_curves": "object",
            "settings": "object?", "host": "object?"}
ROW_KEYS = {"id": "string", "label": "string", "unit": "string", "group": "string",
            "values": "object", "runs": "object?", "better": "string?", "target": "string?",
            "verdict": "string?", "moat_vs_haproxy": "number?"}
Report = dict[str, Any]
Row = dict[str, Any]


class ReportError(Exception):
    """The report cannot be read or lacks something the plots need."""


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def expect(value: Any, name: str, kind: str) -> Any:
    """value if it has the JSON kind ("object", "list", "string" or "number"; a trailing "?"
    allows null too); otherwise a ReportError naming it."""
    nullable, kind = kind.endswith("?"), kind.rstrip("?")
    types = {"object": dict, "list": list, "string": str}
    ok = is_number(value) if kind == "number" else isinstance(value, types[kind])
    if not ok and not (nullable and value is None):
        article = "an" if kind == "object" else "a"
        raise ReportError(f"'{name}' should be {article} {kind}{' or null' if nullable else ''}")
    return value


def check(obj: dict[str, Any], key: str, where: str, kind: str) -> Any:
    """obj[key] checked by `expect`; a key whose kind ends in "?" may also be absent."""
    if key not in obj and not kind.endswith("?"):
        raise ReportError(f"missing required key '{where}{key}'")
    return expect(obj.get(key), where + key, kind)


def check_row(row: Any, where: str) -> None:
    expect(row, where, "object")
    for key, kind in ROW_KEYS.items():
        check(row, key, f"{where}.", kind)
    for system in row["values"]:
        check(row["values"], system, f"{where}.values.", "number?")
    for system in row.get("runs") or {}:
        for j, value in enumerate(check(row["runs"], system, f"{where}.runs.", "list")):
            expect(value, f"{where}.runs.{system}[{j}]", "number?")


def load_report(path: str) -> Report:
    """Reads and checks the report; every problem becomes a ReportError naming file and key."""
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except OSError as e:
        raise ReportError(f"cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path} is not valid JSON: {e}") from None
    try:
        expect(report, "(top level)", "object")
        for key, kind in TOP_KEYS.items():
            check(report, key, "", kind)
        for i, system in enumerate(report["systems"]):
            expect(system, f"systems[{i}]", "string")
        for i, row in enumerate(report["rows"]):
            check_row(row, f"rows[{i}]")
        curves = report["latency_curves"]
        for system in curves:
            for j, point in enumerate(check(curves, system, "latency_curves.", "list")):
                expect(point, f"latency_curves.{system}[{j}]", "object")
                for key in ("percentile", "ms"):
                    check(point, key, f"latency_curves.{system}[{j}].", "number")
    except ReportError as e:
        raise ReportError(f"{path}: {e}") from None
    return report


def colours_for(report: Report) -> dict[str, str]:
    """One colour per system, the same in all figures; systems not named here take spares."""
    names = list(dict.fromkeys(report["systems"] + list(report["latency_curves"])))
    spare = iter(SPARE_COLOURS * len(names))
    return {s: SYSTEM_COLOURS.get(s) or next(spare) for s in names}


def fmt(v: float) -> str:
    """1234567 -> '1,234,567', 15.24 -> '15.2', 0.0412 -> '0.0412'."""
    return f"{v:,.0f}" if abs(v) >= 999.5 else f"{v:.3g}"


def run_title(report: Report) -> str:
    """Which run a figure comes from: mode, start time, CPUs, 1-minute load before → after."""
    host = report.get("host") or {}
    load = [str(host.get(k, "")).split()[:1] for k in ("loadavg_start", "loadavg_end")]
    parts = [f"{report['mode']} run" if report.get("mode") else "",
             str(report.get("started_at") or ""),
             f"{host['cpus']} CPUs" if host.get("cpus") else "",
             f"load {load[0][0]} → {load[1][0]}" if all(load) else ""]
    return ", ".join(p for p in parts if p)


def grid_shape(n: int) -> tuple[int, int]:
    """At most three columns, rows as even as possible: 4 -> 2x2, 5 -> 2x3, 7 -> 3x3."""
    nrows = max(1, math.ceil(n / 3))
    return nrows, max(1, math.ceil(n / nrows))


def nines(percentile: float) -> float:
    """The "number of nines" x coordinate: 50% -> 2, 90% -> 10, 99% -> 100, 99.9% -> 1000."""
    return 1.0 / (1.0 - percentile / 100.0)


def value_at(points: list[tuple[float, float]], p: float) -> float | None:
    """Latency at percentile p, interpolated between the curve's points; None outside it."""
    for (p0, v0), (p1, v1) in zip(points, points[1:]):
        if p0 <= p <= p1:
            return v0 if p1 == p0 else v0 + (v1 - v0) * (p - p0) / (p1 - p0)
    return None


def curve_label(system: str, points: list[tuple[float, float]]) -> str:
    """'moat, p50 0.27 ms, p99 0.81 ms' (each part only if the curve covers it)."""
    marks = [(name, value_at(points, p)) for name, p in (("p50", 50.0), ("p99", 99.0))]
    return system + "".join(f", {name} {fmt(v)} ms" for name, v in marks if v is not None)


def plot_latency(plt: Any, report: Report, colours: dict[str, str]) -> Figure:
    """Latency against percentile, one line per system, on a "number of nines" x axis."""
    fig, ax = plt.subplots(figsize=(9, 5.5), layout="constrained")
    rate = (report.get("settings") or {}).get("rate")
    offered = f" at {fmt(rate)} req/s offered" if is_number(rate) else ""
    ax.set_title(f"HTTP latency by percentile{offered}\n{run_title(report)}")
    curves, top_x, latencies = report["latency_curves"], 1.0, []
    for system in [s for s in colours if curves.get(s)]:
        points = sorted((p["percentile"], p["ms"]) for p in curves[system]
                        if 0 <= p["percentile"] < 100)
        if not points:
            continue
        xs = [nines(p) for p, _ in points]
        ax.plot(xs, [ms for _, ms in points], color=colours[system], lw=2.2, marker="o", ms=3,
                label=curve_label(system, points))
        top_x = max(top_x, xs[-1])
        latencies += [ms for _, ms in points if ms > 0]
    if not latencies:
        ax.axis("off")
        ax.text(0.5, 0.5, "no latency curves in this report", ha="center", transform=ax.transAxes)
        return fig
    ax.set_xscale("log")
    ticks = [(x, name) for x, name in NINES_TICKS if x <= top_x * 1.05]
    ax.set_xticks([x for x, _ in ticks], [name for _, name in ticks])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set_xlim(1.0, top_x * 1.15)
    if max(latencies) / min(latencies) > 30:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(plt.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_formatter(plt.NullFormatter())
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms)")
    ax.grid(True, which="major", alpha=0.35)
    ax.legend(loc="upper left", frameon=False)
    return fig


def subtitle(row: Row) -> str:
    """'Moat/HAProxy 1.16x — target >= 1.2x HAProxy: missed', on two lines when long."""
    parts = []
    if row.get("moat_vs_haproxy") is not None:
        parts.append(f"Moat/HAProxy {row['moat_vs_haproxy']:.2f}x")
    verdict = f": {row['verdict']}" if row.get("verdict") else ""
    if row.get("target"):
        parts.append(f"target {row['target']}{verdict}")
    elif verdict:
        parts.append(verdict[2:])
    text = " — ".join(parts)
    return text if len(text) <= 44 else "\n".join(parts)


def draw_bars(ax: Axes, row: Row, systems: list[str], colours: dict[str, str],
              sub_lines: int) -> None:
    """A bar per system that has a value (the median) labelled with it, a dot per repeat; the
    title leaves room for `sub_lines` lines of subtitle so titles line up across a figure."""
    shown = [s for s in systems if row["values"].get(s) is not None]
    tops = []
    for x, system in enumerate(shown):
        value = row["values"][system]
        ax.bar(x, value, width=0.62, color=colours[system], zorder=2)
        repeats = [r for r in (row.get("runs") or {}).get(system, []) if r is not None]
        for i, r in enumerate(repeats):
            dx = 0.0 if len(repeats) == 1 else -0.14 + 0.28 * i / (len(repeats) - 1)
            ax.scatter(x + dx, r, s=16, color="black", edgecolors="white", linewidths=0.7,
                       zorder=3)
        tops.append(max([value] + repeats))
        ax.annotate(fmt(value), (x, tops[-1]), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=9, fontweight="bold")
    ax.set_xticks(range(len(shown)), shown)
    ax.set_xlim(-0.6, max(len(shown), 1) - 0.4)
    ax.set_ylim(0, max(tops, default=1) * 1.2 or 1)
    if not shown:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes,
                color="grey")
    better = f" ({row['better']} is better)" if row.get("better") in ("higher", "lower") else ""
    ax.set_ylabel((row["unit"] + better).strip(), fontsize=9)
    ax.yaxis.set_major_formatter(lambda v, _: fmt(v) if v else "0")
    ax.grid(True, axis="y", alpha=0.35, zorder=0)
    ax.spines[["top", "right"]].set_visible(False)
    pad = 9 + 12 * sub_lines
    ax.set_title(textwrap.fill(row["label"].strip(), 32), fontsize=11, fontweight="bold", pad=pad)
    ax.annotate(subtitle(row), (0.5, 1.0), xycoords="axes fraction", xytext=(0, pad - 5),
                textcoords="offset points", ha="center", va="top", fontsize=9,
                color=VERDICT_COLOURS.get(row.get("verdict") or "", "#444444"))


def plot_bars(plt: Any, report: Report, colours: dict[str, str], groups: tuple[str, ...],
              title: str) -> Figure:
    """A grid of bar charts, one per row whose group is in `groups`, in report order."""
    rows = [r for r in report["rows"] if r["group"] in groups]
    nrows, ncols = grid_shape(len(rows))
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(6.5, 4.2 * ncols), 3.6 * nrows + 0.7),
                             layout="constrained", squeeze=False)
    fig.get_layout_engine().set(hspace=0.08, wspace=0.04)
    fig.suptitle(f"{title}\n{run_title(report)}", fontsize=12)
    flat = list(axes.flat)
    sub_lines = max((len(subtitle(r).splitlines()) for r in rows), default=0)
    for ax, row in zip(flat, rows):
        draw_bars(ax, row, report["systems"], colours, sub_lines)
    for ax in flat[len(rows):]:
        ax.axis("off")
    if not rows:
        flat[0].text(0.5, 0.5, f"no {' or '.join(groups)} rows in this report", ha="center")
    return fig


def import_pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend, or exit 3 saying what to install."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"plot.py: matplotlib is needed for the plots ({e}): tests/setup.sh installs it "
              f"into .venv (then run .venv/bin/python3 benches/plot.py ...); or pip install "
              f"matplotlib=={MATPLOTLIB_PIN}", file=sys.stderr)
        sys.exit(3)
    return plt


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] in ("-h", "--help"):
        print(f"usage: {argv[0]} REPORT.json OUTDIR\n\n{__doc__}", file=sys.stderr)
        return 2
    report_path, outdir = argv[1], argv[2]
    try:
        report = load_report(report_path)
    except ReportError as e:
        print(f"plot.py: {e}", file=sys.stderr)
        return 2
    plt = import_pyplot()
    colours = colours_for(report)
    figures = {
        "latency.png": plot_latency(plt, report, colours),
        "throughput.png": plot_bars(plt, report, colours, ("throughput", "connections"),
                                    "Throughput and connections"),
        "cost.png": plot_bars(plt, report, colours, ("cpu", "memory"), "CPU and memory cost"),
    }
    try:
        os.makedirs(outdir, exist_ok=True)
        for name, fig in figures.items():
            path = os.path.join(outdir, name)
            fig.savefig(path, dpi=110)
            plt.close(fig)
            print(path)
    except OSError as e:
        print(f"plot.py: cannot write to {outdir}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
