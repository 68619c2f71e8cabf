"""scripts/bench.py --quick runs to the end and reports every figure: completeness only, never timings."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench.py"

# name -> (has a floor measured beside it, has a target)
ROWS = {
    "run_true_p50": (True, True),
    "run_true_p99": (True, False),
    "client_run_true_p50": (True, True),
    "opensandbox_run_true_p50": (True, True),
    "run_bin_true_p50": (True, True),
    "stdout_throughput": (True, True),
    "create_first_run_p50": (True, True),
    "interrupt_p50": (False, True),
    "interrupt_p99": (False, True),
    "delete_idle_p50": (True, True),
    "delete_idle_p99": (True, True),
    "concurrent_runs_per_s": (False, True),
    "reattach_p50": (True, True),
    "reattach_p99": (True, True),
    "background_drain_mbps": (True, True),
    "rss_per_session": (True, True),
    "true_p99_idle_sessions": (True, True),
    "rss_idle": (False, True),
    "rss_growth_stalled_stream": (False, True),
    "rss_100_background_runs": (False, True),
}


def number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.timeout(200)
def test_quick_bench_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    document = json.loads(out.read_text())
    assert document["quick"] is True
    assert document["problems"] == []
    assert document["not_measured"] == {}
    figures = {f["name"]: f for f in document["figures"]}
    assert set(figures) == set(ROWS)
    for name, (has_floor, has_target) in ROWS.items():
        fig = figures[name]
        assert number(fig["value"]), fig
        assert fig["unit"] and fig["n"] >= 1, fig
        if has_floor:
            assert number(fig["floor"]) and fig["floor"] > 0 and fig["floor_unit"], fig
        if has_target:
            assert fig["target"] and fig["op"] in ("<=", ">="), fig
            assert number(fig["target_value"]), fig
            assert isinstance(fig["ok"], bool), fig
            assert number(fig["ratio"]), fig
        else:
            assert fig["ok"] is None, fig
    # The printed table has one line per figure.
    for fig in figures.values():
        assert fig["label"] in done.stdout


def test_pairs_summary_compares_rows_and_shows_what_the_old_daemon_cannot_measure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    bench_pairs = importlib.import_module("bench_pairs")

    def doc(run_ms: float, rate: float | None) -> dict[str, Any]:
        figures = [
            {"name": "run_true_p50", "label": "run true", "value": run_ms, "unit": "ms", "floor": 0.2, "op": "<="},
            {"name": "rss_idle", "label": "rss idle", "value": 43.0, "unit": "MB", "floor": None, "op": "<="},
        ]
        missing: dict[str, dict[str, str]] = {}
        if rate is None:
            missing["background_drain_mbps"] = {"label": "drain", "reason": "route missing (POST -> 400 X)"}
        else:
            figures.append({"name": "background_drain_mbps", "label": "drain", "value": rate, "unit": "MB/s",
                            "floor": 400.0, "op": ">="})  # fmt: skip
        return {"figures": figures, "not_measured": missing}

    old = [doc(1.0, None), doc(1.2, None), doc(1.1, None)]
    new = [doc(0.8, 300.0), doc(0.9, 320.0), doc(0.85, 310.0)]
    rows = {row["name"]: row for row in bench_pairs.summarize(old, new)}
    assert list(rows) == ["run_true_p50", "background_drain_mbps", "rss_idle"]  # bench.py's row order
    run = rows["run_true_p50"]
    assert run["old"] == 1.1 and run["new"] == 0.85 and run["verdict"] == "better"
    assert math.isclose(run["change_pct"], (0.85 / 1.1 - 1) * 100)
    assert run["floor_change_pct"] == 0.0
    assert rows["rss_idle"]["verdict"] == "same"
    drain = rows["background_drain_mbps"]
    assert drain["old"] is None and drain["new"] == 310.0 and "change_pct" not in drain
    text = bench_pairs.table(list(rows.values()), 3, 3, "ce56aef", "working tree")
    assert "not measured (route missing)" in text and "-22.7%" in text
