#!/usr/bin/env python3
"""Run scripts/bench.py in pairs, an old daemon and a new one turn about, and compare them row by row.

A change on a run's byte path is measured in pairs: the machine is shared and its speed drifts
within minutes, so two daemons measured apart differ by more than most changes. Each pair runs the
same bench (this checkout's client and floors) twice, once with the daemon of a base checkout and
once with the daemon of the new one, alternating which goes first; the table gives per row the
median over the pairs of each side, the change of the medians, every pair's own change, and the
change of the row's floor (which should stay near 0: it is the same code on both sides).

    scripts/bench-pairs                      # 3 pairs, full bench, base = merge base with upstream (else HEAD)
    scripts/bench-pairs --base ce56aef -n 5  # against that commit, 5 pairs
    scripts/bench-pairs --quick -n 2         # a quick look

The base checkout is a `git worktree add --detach` of the base commit under /tmp (created once,
reused while it holds that commit; `git worktree remove PATH` drops it), or `--base-root PATH`. The
new side is this checkout's working tree, uncommitted changes included (or `--new-root PATH`). Both
daemons run on this checkout's venv. Rows the old daemon cannot measure (it lacks a route) show as
such.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import FIGURE_NAMES, fmt  # scripts/ is on sys.path when this file is run

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench.py"
NOISE_PCT = 1.0  # a pair's change this small says neither better nor worse
ACCEPTED = {0: "", 3: "", 4: "with PROBLEMs (see its log)", 5: "some rows not measured"}


def git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def default_base() -> str:
    """The merge base with the branch's upstream when it has one, else HEAD (the last commit)."""
    upstream = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{upstream}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if upstream.returncode == 0 and upstream.stdout.strip():
        return git("merge-base", "HEAD", upstream.stdout.strip())
    return "HEAD"


def base_checkout(rev: str) -> Path:
    """A worktree of `rev` under /tmp: reused when it already holds that commit."""
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    path = Path(tempfile.gettempdir()) / f"execd-base-{sha[:12]}"
    if path.exists():
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
        if head.returncode == 0 and head.stdout.strip() == sha:
            return path
        raise SystemExit(f"{path} exists but does not hold {sha}: remove it (git worktree remove {path})")
    git("worktree", "add", "--detach", str(path), sha)
    return path


def run_bench(side: str, root: Path, index: int, outdir: Path, quick: bool, extra: list[str]) -> dict[str, Any]:
    out = outdir / f"{side}-{index}.json"
    log_path = outdir / f"{side}-{index}.log"
    command = [sys.executable, str(BENCH), "--json", str(out), "--daemon-root", str(root), *extra]
    if quick:
        command.append("--quick")
    start = time.monotonic()
    with open(log_path, "wb") as log_file:
        status = subprocess.run(command, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT).returncode
    elapsed = time.monotonic() - start
    if status not in ACCEPTED or not out.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"bench of {side} (pair {index + 1}) exited {status}; {log_path}:\n{tail}")
    note = ACCEPTED[status]
    print(f"  pair {index + 1}, {side}: {elapsed:.0f} s{', ' + note if note else ''}", file=sys.stderr, flush=True)
    document: dict[str, Any] = json.loads(out.read_text())
    return document


def higher_is_better(fig: dict[str, Any]) -> bool:
    if fig.get("op") in ("<=", ">="):
        return bool(fig["op"] == ">=")
    return str(fig["unit"]).endswith("/s")


def verdict(pairs_pct: list[float], up: bool) -> str:
    """`better` or `worse` when every pair moved the same way by more than NOISE_PCT, `same` when no
    pair did, else `mixed`."""
    moves = {"same" if abs(p) <= NOISE_PCT else "better" if (p > 0) == up else "worse" for p in pairs_pct}
    return moves.pop() if len(moves) == 1 else "mixed"


def pct(new: float, old: float) -> float:
    return (new / old - 1.0) * 100.0 if old else float("nan")


def summarize(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per row: medians of each side, the change, each pair's change, the floors' change."""
    rows = []
    docs = old + new
    seen = {f["name"] for d in docs for f in d["figures"]} | {n for d in docs for n in d.get("not_measured", {})}
    names = [n for n in FIGURE_NAMES if n in seen] + sorted(seen - set(FIGURE_NAMES))
    for name in names:
        sides = []
        for docs in (old, new):
            figs = [next((f for f in d["figures"] if f["name"] == name), None) for d in docs]
            sides.append(figs)
        old_figs, new_figs = sides
        any_fig = next((f for f in old_figs + new_figs if f is not None), None)
        label = any_fig["label"] if any_fig else next(d["not_measured"][name]["label"] for d in old + new
                                                      if name in d.get("not_measured", {}))  # fmt: skip
        row: dict[str, Any] = {"name": name, "label": label, "unit": any_fig["unit"] if any_fig else None}
        for side, figs, docs in (("old", old_figs, old), ("new", new_figs, new)):
            values = [f["value"] for f in figs if f is not None]
            floors = [f["floor"] for f in figs if f is not None and f.get("floor") is not None]
            row[side] = statistics.median(values) if values else None
            row[f"{side}_floor"] = statistics.median(floors) if floors else None
            row[f"{side}_n"] = len(values)
            reasons = {d["not_measured"][name]["reason"] for d in docs if name in d.get("not_measured", {})}
            row[f"{side}_missing"] = "; ".join(sorted(reasons)) or None
        if row["old"] is not None and row["new"] is not None and any_fig is not None:
            row["change_pct"] = pct(row["new"], row["old"])
            row["pairs_pct"] = [pct(n["value"], o["value"]) for o, n in zip(old_figs, new_figs, strict=True) if o and n]
            if row["old_floor"] is not None and row["new_floor"] is not None:
                row["floor_change_pct"] = pct(row["new_floor"], row["old_floor"])
            row["verdict"] = verdict(row["pairs_pct"], higher_is_better(any_fig))
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], n_old: int, n_new: int, old_name: str, new_name: str) -> str:
    lines = [
        f"| figure | old: {old_name} (median of {n_old}) | new: {new_name} (median of {n_new}) | change "
        "| each pair | pairs say | floor change |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = []
        for side in ("old", "new"):
            if row[side] is None:
                reason = row[f"{side}_missing"] or "no figure"
                cells.append(f"not measured ({reason.split(' (')[0]})")
            else:
                cells.append(fmt(row[side], row["unit"]))
        if "change_pct" in row:
            pairs = ", ".join(f"{p:+.1f}%" for p in row["pairs_pct"])
            floor = f"{row['floor_change_pct']:+.1f}%" if "floor_change_pct" in row else "-"
            delta = row["new"] - row["old"]
            change = f"{'+' if delta >= 0 else '-'}{fmt(abs(delta), row['unit'])} ({row['change_pct']:+.1f}%)"
            tail = f"{change} | {pairs} | {row['verdict']} | {floor}"
        else:
            tail = "- | - | - | -"
        lines.append(f"| {row['label']} | {cells[0]} | {cells[1]} | {tail} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Arguments after -- go to every scripts/bench.py run.",
    )
    parser.add_argument("-n", "--pairs", type=int, default=3, help="how many pairs (default 3)")
    parser.add_argument("--base", metavar="REV", help="base commit (default: merge base with upstream, else HEAD)")
    parser.add_argument("--base-root", type=Path, metavar="PATH", help="base checkout to use instead of a worktree")
    parser.add_argument("--new-root", type=Path, default=ROOT, metavar="PATH", help="new checkout (default: this)")
    parser.add_argument("--quick", action="store_true", help="the quick bench in each run")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the rows and every run's figures there")
    parser.add_argument("--outdir", type=Path, metavar="DIR", help="keep each run's JSON and log there")
    parser.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    if args.base_root is not None:
        old_root, old_name = args.base_root.resolve(), str(args.base_root)
    else:
        rev = args.base or default_base()
        old_root = base_checkout(rev)
        short = git("rev-parse", "--short", f"{rev}^{{commit}}")
        old_name = short if short.startswith(rev) or rev.startswith(short) else f"{rev} ({short})"
    new_root = args.new_root.resolve()
    new_name = "working tree" if new_root == ROOT else str(args.new_root)
    outdir = args.outdir or Path(tempfile.mkdtemp(prefix="execd-bench-pairs-"))
    outdir.mkdir(parents=True, exist_ok=True)
    print(f"old: {old_root}\nnew: {new_root}\nruns: {outdir}", file=sys.stderr, flush=True)
    old: list[dict[str, Any]] = []
    new: list[dict[str, Any]] = []
    for i in range(args.pairs):
        order = [("old", old_root, old), ("new", new_root, new)]
        if i % 2:
            order.reverse()  # alternate which side goes first, so a drift of the machine does not favour one
        for side, root, docs in order:
            docs.append(run_bench(side, root, i, outdir, args.quick, args.extra))
    rows = summarize(old, new)
    kind = "quick" if args.quick else "full"
    print(f"\nexecd bench in {args.pairs} pairs ({kind}), old and new daemon turn about\n")
    print(table(rows, len(old), len(new), old_name, new_name))
    if args.json:
        document = {"old": {"root": str(old_root), "runs": old}, "new": {"root": str(new_root), "runs": new}}
        args.json.write_text(json.dumps({**document, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
