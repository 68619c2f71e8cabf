"""The engine without HTTP: execd.shell.Shell driven directly, for races the API cannot time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from execd.shell import Aborted, Completed, NoActiveRun, RunRequest, Shell, ShellConfig
from tests.conftest import assert_no_processes, wait_for


async def test_interrupt_after_the_shell_is_gone_signals_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    shell = Shell(ShellConfig(session_id=f"engine-{os.getpid()}-{id(tmp_path)}", cwd="/", env=dict(os.environ)))
    await shell.start()
    run = shell.run(RunRequest("sleep 100"), "run-1")
    # Closed while the run is on, before its reader has seen the end (a timeout can fire right then).
    await shell.close(Aborted("SESSION_CLOSED", "closed"))
    with pytest.raises(NoActiveRun):
        shell.interrupt()
    assert os.listdir(tmp_path) == []
    events = [event async for event in run]
    assert events[-1] == Aborted("SESSION_CLOSED", "closed")
    assert_no_processes({shell.config.session_id})


async def test_interrupt_after_the_status_arrived_leaves_the_run_alone() -> None:
    shell = Shell(ShellConfig(session_id=f"engine-{os.getpid()}-reported", cwd="/", env=dict(os.environ)))
    await shell.start()
    try:
        run = shell.run(RunRequest("echo done"), "run-1")
        # The reader lags behind (a slow client): the shell has reported, nobody has read it yet.
        await wait_for(lambda: shell._run is not None and shell._run.reported, what="status arrived")
        with pytest.raises(NoActiveRun):
            shell.interrupt()
        events = [event async for event in run]
        assert events[-1] == Completed(0, False, False, "/", shell_exited=False)
        assert shell.alive
    finally:
        await shell.close(None)
    assert_no_processes({shell.config.session_id})


async def test_posix_mode_without_an_err_trap_is_not_taken_for_one() -> None:
    # In POSIX mode `trap -p ERR` prints `trap -- - ERR` for no trap at all.
    shell = Shell(ShellConfig(session_id=f"engine-{os.getpid()}-posix", cwd="/", env=dict(os.environ)))
    await shell.start()
    try:
        for code, expected in (("set -o posix", False), ("trap 'echo e' ERR", True), ("trap - ERR", False)):
            events = [event async for event in shell.run(RunRequest(code), f"run-{code}")]
            assert isinstance(events[-1], Completed)
            assert shell._err_trap is expected, code
    finally:
        await shell.close(None)
    assert_no_processes({shell.config.session_id})
