from tests.conftest import Daemon


async def test_run_streams_stdout_and_stderr_separately(daemon: Daemon) -> None:
    session = await daemon.create()
    result = await daemon.run(session["session_id"], "echo out; echo err >&2")
    assert result.events[0].type == "init"
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"
    assert result.complete["exit_code"] == 0
