"""scripts/bench.py --quick runs to the end and reports every figure: completeness only, never timings."""

from __future__ import annotations

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
    "run_bin_true_p50": (True, True),
    "stdout_throughput": (True, True),
    "create_first_run_p50": (True, True),
    "interrupt_p50": (False, True),
    "interrupt_p99": (False, True),
    "concurrent_runs_per_s": (False, True),
    "rss_per_session": (True, True),
    "true_p99_idle_sessions": (True, True),
    "rss_idle": (False, True),
    "rss_growth_stalled_stream": (False, True),
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
