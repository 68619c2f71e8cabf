"""The status channel against the session's own code: what a background job or a run writes into
it may end only the writer's own run, never a later one, and never hangs or burns the daemon."""

from __future__ import annotations

import time

from tests.conftest import Daemon, wait_for
from tests.helpers_core import get_session

# A record as the wrapper writes one: trap text, then NAME, STATUS, FLAGS and PWD, each after a NUL.
FORGE = """printf '\\0%s\\0%s\\0%s\\0%s\\0' "$1" 42 hB /forged >"$__execd_dir/status\""""


async def test_a_background_job_cannot_end_a_later_run_with_a_forged_record(daemon: Daemon) -> None:
    sid = (await daemon.create())["session_id"]
    # The job guesses every name a next run could have had before (run numbers), and this run's.
    job = f'forge() {{ {FORGE}; }}; (sleep 0.3; for n in $(seq 0 20) "$__execd_s"; do forge $n; done) &'
    assert (await daemon.run(sid, job)).complete["exit_code"] == 0
    later = await daemon.run(sid, "sleep 0.8; echo real")
    assert later.stdout == "real\n"
    assert later.complete["exit_code"] == 0 and later.complete["cwd"] != "/forged"


async def test_junk_flooding_the_status_channel_ends_the_session_failed_without_burning_the_daemon(
    daemon: Daemon,
) -> None:
    sid = (await daemon.create())["session_id"]
    started = time.process_time()
    result = await daemon.run(sid, 'head -c 32000000 /dev/zero | tr "\\0" x >"$__execd_dir/status"; sleep 30')
    spent = time.process_time() - started
    assert result.terminal.type == "error" and result.terminal.data["code"] == "SESSION_DIED"
    session = await wait_for(lambda: get_session(daemon, sid), what="session")
    assert session["state"] == "failed" and "status channel" in session["reason"]
    assert spent < 5, f"the daemon spent {spent:.1f} s of CPU on the junk"
