#!/usr/bin/env python3
"""Tests for benches/plot.py: runs it as a program on tiny synthetic reports.

Run with the interpreter that has matplotlib (tests/setup.sh installs it into .venv):
    .venv/bin/python3 benches/test_plot.py -v
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import unittest
from typing import Any

PLOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plot.py")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_report() -> dict[str, Any]:
    """Two rows per plot, a null value (direct has no proxy CPU) and short latency curves."""
    def row(id: str, group: str, values: dict[str, Any], **extra: Any) -> dict[str, Any]:
        runs = {s: [v * 0.98, v * 1.02] for s, v in values.items() if v is not None}
        return {"id": id, "label": id.replace("_", " "), "unit": "u", "better": "higher",
                "group": group, "values": values, "runs": runs, **extra}

    curve = [{"percentile": p, "ms": 0.2 + p / 100} for p in (0.0, 50.0, 90.0, 99.0, 99.9)]
    return {
        "bench": "mesh", "mode": "smoke", "started_at": "2026-11-22T10:00:00Z",
        "host": {"cpus": 2, "loadavg_start": "0.5 0.4 0.3", "loadavg_end": "1.9 1.1 0.6"},
        "settings": {"rate": 2000, "repeats": 2},
        "systems": ["direct", "moat", "haproxy"],
        "runs": [],
        "rows": [
            row("bulk1_gbit_s", "throughput", {"direct": 15.2, "moat": 5.1, "haproxy": 4.4},
                moat_vs_haproxy=1.16, target=">= 1.2x HAProxy", verdict="missed"),
            row("newconn_s", "connections", {"direct": 9000, "moat": 1900, "haproxy": 340}),
            row("p99_ms", "latency", {"direct": 0.9, "moat": 1.8, "haproxy": 2.9}),
            row("cpu_s_per_gb", "cpu", {"direct": None, "moat": 0.52, "haproxy": 0.61}),
            row("rss_idle_mib", "memory", {"moat": 11.2, "haproxy": 9.8}),
        ],
        "latency_curves": {"direct": curve, "moat": curve},
        "extras": [],
    }


class PlotTest(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def run_plot(self, report_text: str, *python_flags: str) -> subprocess.CompletedProcess[str]:
        path = os.path.join(self.tmp.name, "report.json")
        with open(path, "w", encoding="utf-8") as f:
            f.write(report_text)
        cmd = [sys.executable, *python_flags, PLOT, path, os.path.join(self.tmp.name, "out")]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    def test_writes_three_pngs(self) -> None:
        done = self.run_plot(json.dumps(tiny_report()))
        self.assertEqual(done.returncode, 0, done.stderr)
        for name in ("latency.png", "throughput.png", "cost.png"):
            path = os.path.join(self.tmp.name, "out", name)
            self.assertIn(path, done.stdout.splitlines())
            with open(path, "rb") as f:
                self.assertEqual(f.read(8), PNG_SIGNATURE, name)

    def test_malformed_json_exits_2(self) -> None:
        done = self.run_plot('{"systems": [')
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertIn("not valid JSON", done.stderr)
        self.assertNotIn("Traceback", done.stderr)

    def test_missing_key_exits_2_naming_it(self) -> None:
        report = tiny_report()
        del report["rows"][1]["values"]
        done = self.run_plot(json.dumps(report))
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertIn("'rows[1].values'", done.stderr)
        self.assertNotIn("Traceback", done.stderr)

    def test_without_matplotlib_exits_3(self) -> None:
        # -I -S: no site-packages, so no matplotlib whichever interpreter runs the tests.
        done = self.run_plot(json.dumps(tiny_report()), "-I", "-S")
        self.assertEqual(done.returncode, 3, done.stderr)
        self.assertIn("matplotlib is needed", done.stderr)
        self.assertNotIn("Traceback", done.stderr)


if __name__ == "__main__":
    unittest.main()
