"""The run's event log on its own (execd.runlog), for what the HTTP tests cannot reach cheaply:
hundreds of thousands of events, and the exact size of every gap."""

from __future__ import annotations

import json
import tracemalloc

from execd.runlog import COARSE_STEP, OFFSETS_EXACT, RunLog

FRAMES = [(b"f" * (60 + n),) for n in range(5)]  # the log counts frames, it does not read them


def gap_of(log: RunLog, cursor: int) -> dict[str, int]:
    first = log.after(cursor).frames[0]
    assert first[0].startswith(b"event: gap\n"), first
    data: dict[str, int] = json.loads(first[0].split(b"data: ", 1)[1])
    return data


def test_a_log_of_many_small_events_stays_small_and_its_recent_gaps_are_exact() -> None:
    log = RunLog("run", 4096, keep_unsent=False)
    events = 3 * OFFSETS_EXACT + 123
    tracemalloc.start()
    for i in range(events):
        log.append(FRAMES[i % 5])
    grown = sum(
        stat.size
        for stat in tracemalloc.take_snapshot()
        .filter_traces([tracemalloc.Filter(True, "*execd/runlog.py")])
        .statistics("filename")
    )
    tracemalloc.stop()
    # 8 bytes an event would be 3 MiB: the exact range and the checkpoints keep it near 1-2 MiB.
    assert grown < 2 * OFFSETS_EXACT * 8 + events // COARSE_STEP * 8 + 64 * 1024, grown
    size = [len(FRAMES[seq % 5][0]) for seq in range(events)]  # event seq's wire bytes
    # A cursor within the exact range: its gap counts every dropped byte after it, exactly.
    cursor = log.last_seq - OFFSETS_EXACT // 2
    gap = gap_of(log, cursor)
    assert gap["after"] == cursor
    assert gap["dropped_bytes"] == sum(size[cursor + 1 : gap["next_seq"]])
    assert log.dropped_bytes == sum(size[1 : gap["next_seq"]])
    # An older cursor: exact from the next checkpoint on (at most COARSE_STEP - 1 events short).
    old = gap_of(log, 1000)
    exact = sum(size[1001 : old["next_seq"]])
    assert exact - (COARSE_STEP - 1) * max(size) <= old["dropped_bytes"] <= exact


def test_a_retired_log_keeps_few_offsets_and_replays_init_gap_terminal() -> None:
    log = RunLog("run", 4096, keep_unsent=False)
    for i in range(50_000):
        log.append(FRAMES[i % 5])
    log.finish((b"terminal\n\n",))
    size = [len(FRAMES[seq % 5][0]) for seq in range(50_000)]
    tracemalloc.start()
    log.retire()
    snapshot = tracemalloc.take_snapshot()
    tracemalloc.stop()
    assert sum(s.size for s in snapshot.statistics("filename")) < 64 * 1024
    replay = log.after(-1).frames
    assert len(replay) == 3 and replay[-1] == (b"terminal\n\n",)
    gap = json.loads(replay[1][0].split(b"data: ", 1)[1])
    assert gap["after"] == 0 and gap["next_seq"] == 50_000
    assert gap["dropped_bytes"] == sum(size[1:])  # from seq 1, a checkpoint: exact
    recent = gap_of(log, 49_990)
    assert recent["dropped_bytes"] == sum(size[49_991:])
