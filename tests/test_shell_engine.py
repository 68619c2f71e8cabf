"""The engine without HTTP: execd.shell.Shell driven directly, for races the API cannot time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from execd.run import Aborted, Completed, Run, RunLimits, RunRequest
from execd.shell import NoActiveRun, Shell, ShellConfig
from tests.conftest import assert_no_processes, wait_for


def start(shell: Shell, code: str, run_id: str = "run-1", **request: object) -> Run:
    run = Run(run_id, shell.config.session_id, RunRequest(code, **request), RunLimits())  # type: ignore[arg-type]
    shell.start_run(run)
    return run


async def test_interrupt_after_the_shell_is_gone_signals_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    shell = Shell(ShellConfig(session_id=f"engine-{os.getpid()}-{id(tmp_path)}", cwd="/", env=dict(os.environ)))
    await shell.start()
    run = start(shell, "sleep 100")
    # Closed while the run is on (a timeout can fire right then).
    await shell.close(Aborted("SESSION_CLOSED", "closed"))
    with pytest.raises(NoActiveRun):
        shell.interrupt()
    assert os.listdir(tmp_path) == []
    assert run.outcome == Aborted("SESSION_CLOSED", "closed")
    assert_no_processes({shell.config.session_id})


async def test_a_run_ends_by_itself_with_nobody_reading_it() -> None:
    shell = Shell(ShellConfig(session_id=f"engine-{os.getpid()}-reported", cwd="/", env=dict(os.environ)))
    await shell.start()
    try:
        run = start(shell, "echo done")
        # Nobody reads the run's log: the engine still ends it when its status arrives.
        await wait_for(lambda: not run.running, what="run ended")
        with pytest.raises(NoActiveRun):
            shell.interrupt()
        assert run.outcome == Completed(0, False, False, "/", shell_exited=False)
        assert shell.alive and shell.current_run is None
    finally:
        await shell.close(None)
    assert_no_processes({shell.config.session_id})


async def test_posix_mode_without_an_err_trap_is_not_taken_for_one() -> None:
    # In POSIX mode `trap -p ERR` prints `trap -- - ERR` for no trap at all.
    shell = Shell(ShellConfig(session_id=f"engine-{os.getpid()}-posix", cwd="/", env=dict(os.environ)))
    await shell.start()
    try:
        for code, expected in (("set -o posix", False), ("trap 'echo e' ERR", True), ("trap - ERR", False)):
            run = start(shell, code, f"run-{code}")
            await wait_for(lambda run=run: not run.running, what="run ended")  # type: ignore[misc]
            assert isinstance(run.outcome, Completed)
            assert shell._err_trap is expected, code
    finally:
        await shell.close(None)
    assert_no_processes({shell.config.session_id})
