"""The unmodified `opensandbox` SDK (1.1.1) against a live daemon, through the adapter at /opensandbox.

`CommandsAdapter` is what the SDK's `sandbox.commands` is; it is given our endpoint, with a path,
as a sandbox's execd endpoint.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from opensandbox.adapters.command_adapter import CommandsAdapter
from opensandbox.config import ConnectionConfig
from opensandbox.exceptions import SandboxApiException
from opensandbox.models.execd import ExecutionHandlers, ExecutionInit, RunCommandOpts
from opensandbox.models.sandboxes import SandboxEndpoint

from tests.helpers_control import ServedDaemon, served

TOKEN = "opensandbox-secret"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedDaemon]:
    token = tmp_path_factory.mktemp("token") / "token"
    token.write_text(TOKEN)
    with served("--access-token-file", str(token), "--interrupt-grace-ms", "500") as served_daemon:
        yield served_daemon


def commands_for(daemon: ServedDaemon, token: str | None = TOKEN, path: str = "/opensandbox") -> CommandsAdapter:
    headers = {"X-EXECD-ACCESS-TOKEN": token} if token else {}
    endpoint = SandboxEndpoint(endpoint=f"127.0.0.1:{daemon.port}{path}", headers=headers)
    return CommandsAdapter(ConnectionConfig(request_timeout=timedelta(seconds=30)), endpoint)


@pytest.fixture
async def commands(daemon: ServedDaemon) -> AsyncIterator[CommandsAdapter]:
    yield commands_for(daemon)


def stdout(execution: object) -> str:
    return "".join(m.text for m in execution.logs.stdout)  # type: ignore[attr-defined]


async def test_a_session_keeps_its_shell_between_runs(commands: CommandsAdapter) -> None:
    session = await commands.create_session(working_directory="/tmp")
    first = await commands.run_in_session(session, "export GREETING=hi; cd /; pwd")
    second = await commands.run_in_session(session, "echo $GREETING; pwd")
    assert (first.exit_code, stdout(first)) == (0, "/\n")
    assert (second.exit_code, stdout(second)) == (0, "hi\n/\n")
    assert first.complete is not None and first.error is None
    await commands.delete_session(session)


@pytest.mark.parametrize(("code", "expected"), [("true", 0), ("exit_3() { return 3; }; exit_3", 3), ("false", 1)])
async def test_exit_codes_in_a_session(commands: CommandsAdapter, code: str, expected: int) -> None:
    session = await commands.create_session()
    execution = await commands.run_in_session(session, code)
    assert execution.exit_code == expected
    if expected:
        assert execution.error is not None and execution.error.name == "CommandExecError"
    await commands.delete_session(session)


async def test_separate_streams(commands: CommandsAdapter) -> None:
    session = await commands.create_session()
    execution = await commands.run_in_session(session, "echo out; echo err >&2")
    assert stdout(execution) == "out\n"
    assert "".join(m.text for m in execution.logs.stderr) == "err\n"
    await commands.delete_session(session)


async def test_a_timeout_ends_the_run_with_an_error(commands: CommandsAdapter) -> None:
    session = await commands.create_session()
    execution = await commands.run_in_session(session, "sleep 30", timeout=timedelta(milliseconds=300))
    assert execution.error is not None and execution.error.name == "CommandExecError"
    assert execution.exit_code == 130
    assert "timeout" in execution.error.traceback[0]
    after = await commands.run_in_session(session, "echo alive")
    assert stdout(after) == "alive\n"
    await commands.delete_session(session)


async def test_exit_in_a_session_reports_its_code_and_the_session_goes_on(commands: CommandsAdapter) -> None:
    session = await commands.create_session()
    await commands.run_in_session(session, "cd /tmp; X=gone")
    execution = await commands.run_in_session(session, "exit 4")
    assert execution.exit_code == 4
    # As with OpenSandbox's execd (a bash per run): the session goes on, in the cwd it had; the
    # shell's variables are gone with the shell that exited.
    after = await commands.run_in_session(session, 'echo "$PWD ${X-unset}"')
    assert (after.exit_code, stdout(after)) == (0, "/tmp unset\n")
    await commands.delete_session(session)
    with pytest.raises(SandboxApiException) as raised:
        await commands.run_in_session(session, "true")
    assert raised.value.status_code == 404


async def test_busy_and_unknown_sessions_are_errors(commands: CommandsAdapter) -> None:
    session = await commands.create_session()
    started = asyncio.Event()

    async def on_init(_: ExecutionInit) -> None:
        started.set()

    long_run = asyncio.create_task(
        commands.run_in_session(session, "sleep 30", handlers=ExecutionHandlers(on_init=on_init))
    )
    await started.wait()
    with pytest.raises(SandboxApiException) as busy:
        await commands.run_in_session(session, "true")
    assert busy.value.status_code == 409
    await commands.interrupt(session)  # a session's id: its run is interrupted, the session closed
    interrupted = await long_run
    assert interrupted.exit_code is None or interrupted.exit_code == 130
    with pytest.raises(SandboxApiException) as unknown:
        await commands.run_in_session(session, "true")
    assert unknown.value.status_code == 404
    with pytest.raises(SandboxApiException) as gone:
        await commands.delete_session(session)
    assert gone.value.status_code == 404


async def test_interrupt_a_foreground_command(commands: CommandsAdapter) -> None:
    ids: list[str] = []

    async def on_init(init: ExecutionInit) -> None:
        ids.append(init.id)

    task = asyncio.create_task(commands.run("echo started; sleep 30", handlers=ExecutionHandlers(on_init=on_init)))
    while not ids:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    await commands.interrupt(ids[0])
    execution = await task
    assert execution.exit_code == 130
    status = await commands.get_command_status(ids[0])
    assert (status.running, status.exit_code) == (False, 130)


async def test_command_foreground_with_env_cwd_and_exit_code(commands: CommandsAdapter, tmp_path: Path) -> None:
    opts = RunCommandOpts(working_directory=str(tmp_path), envs={"WHO": "execd"})
    execution = await commands.run("echo $WHO; pwd; exit 3", opts=opts)
    assert stdout(execution) == f"execd\n{tmp_path}\n"
    assert execution.exit_code == 3
    ok = await commands.run("true")
    assert ok.exit_code == 0 and ok.id


async def test_command_timeout(commands: CommandsAdapter) -> None:
    execution = await commands.run("sleep 30", opts=RunCommandOpts(timeout=timedelta(milliseconds=300)))
    assert execution.exit_code == 130 and execution.error is not None


async def test_argv_is_quoted(commands: CommandsAdapter) -> None:
    execution = await commands.run(["printf", "%s|", "a b", "$HOME", "it's"])
    assert stdout(execution) == "a b|$HOME|it's|"


async def test_background_command_status_and_logs_with_cursor(commands: CommandsAdapter) -> None:
    execution = await commands.run("echo one; sleep 0.5; echo two; exit 5", opts=RunCommandOpts(background=True))
    assert execution.id and execution.exit_code is None
    status = await commands.get_command_status(execution.id)
    assert status.running and status.content is not None and "echo one" in status.content
    first = await _logs_until(commands, execution.id, None, "one\n")
    while (await commands.get_command_status(execution.id)).running:
        await asyncio.sleep(0.05)
    rest = await commands.get_background_command_logs(execution.id, cursor=first.cursor)
    assert rest.content == "two\n"
    status = await commands.get_command_status(execution.id)
    assert (status.running, status.exit_code, status.finished_at is not None) == (False, 5, True)
    again = await commands.get_background_command_logs(execution.id, cursor=rest.cursor)
    assert again.content == ""


async def _logs_until(commands: CommandsAdapter, command_id: str, cursor: int | None, text: str) -> object:
    for _ in range(100):
        logs = await commands.get_background_command_logs(command_id, cursor=cursor)
        if logs.content == text:
            return logs
        await asyncio.sleep(0.02)
    raise AssertionError(f"the logs never read {text!r}")


async def test_interrupt_a_background_command(commands: CommandsAdapter) -> None:
    execution = await commands.run("sleep 30", opts=RunCommandOpts(background=True))
    assert execution.id
    await commands.interrupt(execution.id)
    for _ in range(100):
        status = await commands.get_command_status(execution.id)
        if not status.running:
            break
        await asyncio.sleep(0.05)
    assert (status.running, status.exit_code) == (False, 130)


async def test_unknown_command_is_404(commands: CommandsAdapter) -> None:
    with pytest.raises(SandboxApiException) as raised:
        await commands.get_command_status("nope")
    assert raised.value.status_code == 404


async def test_uid_runs_as_that_user_or_is_refused(commands: CommandsAdapter) -> None:
    """Through the run-as mechanism where the daemon may switch users (root), else a clear 400."""
    other = 65534 if os.geteuid() == 0 else os.geteuid() + 1
    if os.geteuid() == 0:
        execution = await commands.run("id -u", opts=RunCommandOpts(uid=other, gid=other))
        assert stdout(execution) == f"{other}\n"
    else:
        with pytest.raises(SandboxApiException) as raised:
            await commands.run("id -u", opts=RunCommandOpts(uid=other))
        assert raised.value.status_code == 400
    same = await commands.run("id -u", opts=RunCommandOpts(uid=os.geteuid()))
    assert stdout(same) == f"{os.geteuid()}\n"


async def test_a_wrong_or_missing_token_is_401(daemon: ServedDaemon) -> None:
    for token in (None, "wrong"):
        with pytest.raises(SandboxApiException) as raised:
            await commands_for(daemon, token).create_session()
        assert raised.value.status_code == 401


async def test_at_root_the_session_routes_speak_opensandbox() -> None:
    with served("--opensandbox-at-root") as daemon:
        commands = commands_for(daemon, None, "")
        session = await commands.create_session()
        execution = await commands.run_in_session(session, "exit 3")
        assert execution.exit_code == 3
        assert (await commands.run("echo root")).exit_code == 0


@pytest.mark.parametrize(
    "body",
    [
        {"command": "env", "envs": {"EXECD_SESSION_ID": "x"}},
        {"command": "env", "envs": {"BASH_ENV": "/tmp/evil"}},
        {"command": "env", "envs": {"not a name": "1"}},
        {"command": "echo a\u0000b"},
        {"argv": ["echo", "a\u0000b"]},
        {"command": "pwd", "cwd": "/no/such/dir"},
    ],
    ids=["session-tag", "bash-env", "bad-name", "nul-command", "nul-argv", "missing-cwd"],
)
def test_a_command_body_gets_the_native_checks(daemon: ServedDaemon, body: dict[str, object]) -> None:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"{daemon.url}/opensandbox/command",
        data=json.dumps(body).encode(),
        headers={"X-EXECD-ACCESS-TOKEN": TOKEN, "Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400
    assert json.loads(refused.value.read())["code"] == "INVALID_REQUEST"
