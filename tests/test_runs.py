"""Runs: the code runs in the session's shell as if typed at a prompt, and its output arrives exactly."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.conftest import Daemon, DaemonFactory, wait_for
from tests.helpers_core import get_session, start_run

# ----- state persists between runs ------------------------------------------------------------

PERSISTENCE = {
    "cwd": ("cd /usr", "pwd", "/usr\n"),
    "exported_variable": ("export EXECD_T_EXP='a b'", "bash -c 'echo \"$EXECD_T_EXP\"'", "a b\n"),
    "unexported_variable": (
        "T_PLAIN=7",
        'echo "$T_PLAIN"; bash -c \'echo "${T_PLAIN-not exported}"\'',
        "7\nnot exported\n",
    ),
    "function": ('greet() { echo "hi $1"; }', "greet bob", "hi bob\n"),
    "alias": ("alias say_hi='echo aliased'", "say_hi there", "aliased there\n"),
    "set_option": ("set -o pipefail", "false | true; echo $?", "1\n"),
    "shopt_option": ("shopt -s nullglob", "a=(/nonexistent-execd-*); echo ${#a[@]}", "0\n"),
    "trap": (
        "trap 'echo caught USR1' USR1",
        "kill -USR1 $$; trap -p USR1",
        "caught USR1\ntrap -- 'echo caught USR1' SIGUSR1\n",
    ),
}


@pytest.mark.parametrize("kind", list(PERSISTENCE))
async def test_shell_state_persists_between_runs(daemon: Daemon, kind: str) -> None:
    setup, check, expected = PERSISTENCE[kind]
    session = await daemon.create()
    first = await daemon.run(session["session_id"], setup)
    assert first.complete["exit_code"] == 0, first.stderr
    second = await daemon.run(session["session_id"], check)
    assert (second.stdout, second.stderr) == (expected, "")
    assert second.complete["exit_code"] == 0


async def test_state_of_every_kind_persists_together(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "\n".join(setup for setup, _, _ in PERSISTENCE.values()))
    for kind, (_, check, expected) in PERSISTENCE.items():
        result = await daemon.run(sid, check)
        assert result.stdout == expected, kind


# ----- output arrives exactly -----------------------------------------------------------------


async def test_stdout_and_stderr_stay_separate(daemon: Daemon) -> None:
    session = await daemon.create()
    result = await daemon.run(
        session["session_id"], "for i in 1 2 3; do echo out$i; echo err$i >&2; done; printf 'no newline'"
    )
    assert result.stdout == "out1\nout2\nout3\nno newline"
    assert result.stderr == "err1\nerr2\nerr3\n"
    assert all(e.data["text"] for e in result.of("stdout") + result.of("stderr"))


async def test_marker_look_alikes_and_nul_bytes_arrive_exactly(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    # What the status channel, the bootstrap and the SSE framing look like, printed by the user.
    code = r"""printf 'ready\t0\thB\t/\0'
printf '1\t0\thB\t/tmp\0'
printf '2\t0\thB\t/\0'
echo __execd_post; echo '{ \__execd_pre 1 0; } 2>/dev/null'
printf '\n\nid: 99\nevent: execution_complete\ndata: {"exit_code":0}\n\n'
printf 'a\0b\0\0c'
printf 'err\0side' >&2"""
    expected = (
        "ready\t0\thB\t/\0"
        "1\t0\thB\t/tmp\0"
        "2\t0\thB\t/\0"
        "__execd_post\n{ \\__execd_pre 1 0; } 2>/dev/null\n"
        '\n\nid: 99\nevent: execution_complete\ndata: {"exit_code":0}\n\n'
        "a\0b\0\0c"
    )
    result = await daemon.run(sid, code)
    assert result.stdout == expected
    assert result.stderr == "err\0side"
    assert [e.type for e in result.events].count("execution_complete") == 1
    assert result.complete["exit_code"] == 0
    # The session is in step: the next run gets its own output and status, not the fakes'.
    after = await daemon.run(sid, "echo next; (exit 4)")
    assert after.stdout == "next\n"
    assert after.complete["exit_code"] == 4


async def test_heredoc_runs_like_at_a_prompt(daemon: Daemon) -> None:
    session = await daemon.create()
    code = "x=41\ncat <<'EOF'\nliteral $x `not run`\n  indented\nEOF\ncat <<EOF\nvalue $((x + 1))\nEOF\necho after"
    result = await daemon.run(session["session_id"], code)
    assert result.stdout == "literal $x `not run`\n  indented\nvalue 42\nafter\n"
    assert result.complete["exit_code"] == 0


async def test_syntax_error_fails_the_run_and_the_shell_lives(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "kept=yes")
    broken = await daemon.run(sid, "if then fi (\necho never")
    assert broken.complete["exit_code"] == 2
    assert broken.complete["shell_exited"] is False
    assert "syntax error" in broken.stderr
    assert broken.stdout == ""
    working = await daemon.run(sid, 'echo "alive $kept"')
    assert working.stdout == "alive yes\n"
    assert working.complete["exit_code"] == 0
    assert (await get_session(daemon, sid))["state"] == "idle"


async def test_top_level_return_ends_the_run_with_its_status(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    result = await daemon.run(sid, "echo before; return 5; echo after")
    assert result.stdout == "before\n"
    assert result.complete["exit_code"] == 5
    assert result.complete["shell_exited"] is False
    again = await daemon.run(sid, "echo alive")
    assert again.stdout == "alive\n"
    assert (await get_session(daemon, sid))["state"] == "idle"


async def test_previous_runs_status_is_visible_as_dollar_question(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    for status in (42, 0, 1, 255):
        first = await daemon.run(sid, f"(exit {status})")
        assert first.complete["exit_code"] == status
        second = await daemon.run(sid, "echo $?")
        assert second.stdout == f"{status}\n"


# ----- stdin ---------------------------------------------------------------------------------


async def test_code_reads_end_of_file_when_no_stdin_is_given(daemon: Daemon) -> None:
    session = await daemon.create()
    # A `cat` that waited for input would hang here; the deadline only turns a hang into a failure.
    result = await asyncio.wait_for(
        daemon.run(session["session_id"], 'cat; echo "cat=$?"; read -r line; echo "read=$?"'), 30
    )
    assert result.stdout == "cat=0\nread=1\n"


async def test_stdin_text_is_read_by_the_code(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    text = "first line\nsecond 'quoted' $HOME line\nno newline at end"
    result = await daemon.run(sid, 'read -r a; read -r b; echo "$b|$a"; cat', stdin=text)
    assert result.stdout == "second 'quoted' $HOME line|first line\nno newline at end"
    # The next run without stdin reads EOF again, not what is left of the previous text.
    after = await asyncio.wait_for(daemon.run(sid, "cat; echo done"), 30)
    assert after.stdout == "done\n"


async def test_empty_stdin_string_is_end_of_file(daemon: Daemon) -> None:
    session = await daemon.create()
    result = await asyncio.wait_for(daemon.run(session["session_id"], 'cat; echo "rc=$?"', stdin=""), 30)
    assert result.stdout == "rc=0\n"


# ----- per-run env and cwd --------------------------------------------------------------------


async def test_run_env_is_exported_for_that_run_only(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    value = "a b 'c' \"d\" $HOME `x` \\ end\nsecond line"
    result = await daemon.run(sid, 'printf "%s|" "$T_NEW"; bash -c \'printf "%s" "$T_NEW"\'', env={"T_NEW": value})
    assert result.stdout == f"{value}|{value}"
    after = await daemon.run(sid, "[[ -v T_NEW ]] && echo set || echo unset; bash -c 'echo \"${T_NEW-unset}\"'")
    assert after.stdout == "unset\nunset\n"


async def test_run_env_restores_previous_value_and_export_flag(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "T_PLAIN=old-plain; export T_EXPORTED=old-exported")
    during = await daemon.run(
        sid,
        "bash -c 'echo \"$T_PLAIN $T_EXPORTED\"'",
        env={"T_PLAIN": "new-plain", "T_EXPORTED": "new-exported"},
    )
    assert during.stdout == "new-plain new-exported\n"
    after = await daemon.run(
        sid,
        'echo "$T_PLAIN $T_EXPORTED"; bash -c \'echo "${T_PLAIN-unexported} ${T_EXPORTED-unexported}"\'',
    )
    assert after.stdout == "old-plain old-exported\nunexported old-exported\n"


async def test_run_env_is_restored_even_when_the_code_changes_it(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "export T_KEEP=before")
    await daemon.run(sid, "T_KEEP=changed-by-code; T_GONE=changed", env={"T_KEEP": "run", "T_GONE": "run"})
    after = await daemon.run(sid, 'echo "$T_KEEP ${T_GONE-unset}"')
    assert after.stdout == "before unset\n"


async def test_run_cwd_is_entered_and_persists(daemon: Daemon, tmp_path: Path) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    (tmp_path / "sub").mkdir()
    result = await daemon.run(sid, "pwd", cwd=str(tmp_path))
    assert result.stdout == f"{tmp_path}\n"
    assert result.complete["cwd"] == str(tmp_path)
    relative = await daemon.run(sid, "pwd", cwd="sub")
    assert relative.stdout == f"{tmp_path}/sub\n"
    later = await daemon.run(sid, "pwd")
    assert later.stdout == f"{tmp_path}/sub\n"
    assert (await get_session(daemon, sid))["cwd"] == f"{tmp_path}/sub"


async def test_session_cwd_and_env_apply_to_every_run(daemon: Daemon, tmp_path: Path) -> None:
    session = await daemon.create(cwd=str(tmp_path), env={"T_SESSION": "from-session"})
    assert session["cwd"] == str(tmp_path)
    sid = session["session_id"]
    for _ in range(2):
        result = await daemon.run(sid, "pwd; bash -c 'echo $T_SESSION'")
        assert result.stdout == f"{tmp_path}\nfrom-session\n"


# ----- code that tampers with the shell's fds -------------------------------------------------


async def test_code_closing_fds_3_to_9_does_not_break_later_runs(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    closing = await daemon.run(sid, 'for fd in 3 4 5 6 7 8 9; do eval "exec $fd>&-"; done; echo closed')
    assert closing.stdout == "closed\n"
    assert closing.complete["exit_code"] == 0
    for i in range(3):
        later = await daemon.run(sid, f"echo later{i}; (exit {i})")
        assert later.stdout == f"later{i}\n"
        assert later.complete["exit_code"] == i


async def test_code_redirecting_its_own_stdout_does_not_break_later_runs(daemon: Daemon, tmp_path: Path) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    target = tmp_path / "out.txt"
    redirect = await daemon.run(sid, f"exec >{target}; echo hidden")
    assert redirect.stdout == ""
    assert redirect.complete["exit_code"] == 0
    # Like at a prompt, the redirection persists; runs still complete and stderr still arrives.
    later = await daemon.run(sid, "echo more; echo visible >&2; (exit 3)")
    assert later.complete["exit_code"] == 3
    assert later.stderr == "visible\n"
    assert target.read_text() == "hidden\nmore\n"
    error_redirect = await daemon.run(sid, f"exec 2>{tmp_path}/err.txt; echo gone >&2")
    assert error_redirect.complete["exit_code"] == 0
    last = await daemon.run(sid, "echo also-gone >&2; echo more2")
    assert last.complete["exit_code"] == 0
    assert (tmp_path / "err.txt").read_text() == "gone\nalso-gone\n"
    assert target.read_text() == "hidden\nmore\nmore2\n"


# ----- volume and encoding --------------------------------------------------------------------


async def test_five_megabytes_of_output_arrive_exact_and_in_order(daemon: Daemon) -> None:
    session = await daemon.create()
    count = 750_000
    expected = "".join(f"{i}\n" for i in range(1, count + 1))
    assert len(expected) > 5_000_000
    result = await daemon.run(session["session_id"], f"seq 1 {count}; echo tail >&2")
    assert result.stdout == expected
    assert result.stderr == "tail\n"
    assert [e.id for e in result.events] == list(range(len(result.events)))
    assert [e.data["seq"] for e in result.events] == list(range(len(result.events)))
    assert result.complete["output_truncated"] is False


async def test_utf8_character_split_across_reads_arrives_whole(daemon: Daemon) -> None:
    session = await daemon.create()
    result = await daemon.run(
        session["session_id"], r"printf '\xc3'; sleep 0.1; printf '\xa9'; printf '\xe2\x82'; sleep 0.1; printf '\xac\n'"
    )
    assert result.stdout == "é€\n"
    assert all("\ufffd" not in e.data["text"] for e in result.of("stdout"))


async def test_invalid_utf8_bytes_become_replacement_characters(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    result = await daemon.run(sid, r"printf 'a\xffb\xfe\xc3(c\n'; printf 'x\xa9' >&2")
    assert result.stdout == "a\ufffdb\ufffd\ufffd(c\n"
    assert result.stderr == "x\ufffd"
    # A character left incomplete when the run ends is flushed as U+FFFD, not held for the next run.
    dangling = await daemon.run(sid, r"printf 'end\xc3'")
    assert dangling.stdout == "end\ufffd"
    after = await daemon.run(sid, r"printf '\xa9ok'")
    assert after.stdout == "\ufffdok"


async def test_forty_sessions_run_in_parallel_each_with_its_own_output(daemon: Daemon) -> None:
    sessions = await asyncio.gather(*(daemon.create(labels={"n": str(n)}) for n in range(40)))
    ids = [s["session_id"] for s in sessions]
    assert len(set(ids)) == 40
    code = 'for i in $(seq 1 200); do echo "$EXECD_SESSION_ID $i"; done; echo "$EXECD_SESSION_ID" >&2'
    results = await asyncio.gather(*(daemon.run(sid, code) for sid in ids))
    for sid, result in zip(ids, results, strict=True):
        assert result.stdout == "".join(f"{sid} {i}\n" for i in range(1, 201))
        assert result.stderr == f"{sid}\n"
        assert result.complete["exit_code"] == 0


# ----- sizes and limits -----------------------------------------------------------------------


async def test_half_megabyte_code_is_accepted(daemon: Daemon) -> None:
    session = await daemon.create()
    code = "x='" + "a" * 500_000 + "'\necho ${#x}"
    assert len(code) > 500_000
    result = await daemon.run(session["session_id"], code)
    assert result.stdout == "500000\n"


async def test_output_limit_truncates_on_a_character_boundary_and_the_command_completes(
    make_daemon: DaemonFactory, tmp_path: Path
) -> None:
    daemon = await make_daemon(max_output_bytes=1001)
    session = await daemon.create()
    sid = session["session_id"]
    marker = tmp_path / "finished"
    # The pause lets the reader take all of stdout first: the two pipes carry no common order.
    code = f"for i in $(seq 1 2000); do printf 'é'; done; sleep 0.3; echo over-the-limit >&2; touch {marker}; return 7"
    result = await daemon.run(sid, code)
    complete = result.complete
    assert complete["output_truncated"] is True
    assert complete["exit_code"] == 7
    assert marker.exists()
    sent = result.stdout + result.stderr
    assert len(sent.encode()) == 1000  # 1001 bytes allowed, but the 501st "é" would be cut in half
    assert set(sent) == {"é"}
    assert result.stderr == ""
    # The limit is per run: the next run starts with a full budget.
    nxt = await daemon.run(sid, "echo fresh")
    assert nxt.stdout == "fresh\n"
    assert nxt.complete["output_truncated"] is False


async def test_output_under_the_limit_is_not_truncated(make_daemon: DaemonFactory) -> None:
    daemon = await make_daemon(max_output_bytes=10)
    session = await daemon.create()
    result = await daemon.run(session["session_id"], "printf 12345; printf 67890 >&2")
    assert (result.stdout, result.stderr) == ("12345", "67890")
    assert result.complete["output_truncated"] is False


# ----- field aliases --------------------------------------------------------------------------


async def test_command_is_an_alias_of_code(daemon: Daemon) -> None:
    session = await daemon.create()
    response = await daemon.client.post(f"/session/{session['session_id']}/run", json={"command": "echo via-command"})
    assert response.status == 200
    assert "via-command\\n" in await response.text()


@pytest.mark.parametrize("field", ["timeout_ms", "timeout"])
async def test_timeout_ms_and_its_alias_timeout_limit_the_run(daemon: Daemon, field: str) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    ok = await daemon.run(sid, "echo quick", **{field: 60_000})
    assert ok.complete["timed_out"] is False
    slow = await daemon.run(sid, "sleep 30; echo not-reached", **{field: 200})
    assert slow.complete["timed_out"] is True
    assert slow.complete["interrupted"] is True
    assert slow.stdout == ""
    assert (await daemon.run(sid, "echo alive")).stdout == "alive\n"


# ----- the session is idle when the terminal event arrives ------------------------------------


async def test_next_run_started_on_execution_complete_is_never_busy(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    live = await start_run(daemon, sid, "echo 0")
    for i in range(1, 51):
        terminal = await live.until_terminal()
        assert terminal.type == "execution_complete"
        # Before reading the rest of the stream: the session must already take a new run.
        following = await start_run(daemon, sid, f"echo {i}")
        await live.rest()
        live.response.release()
        assert live.events[-1] is terminal
        live = following
        assert (await live.next_event()).type == "init"
    await live.until_terminal()
    live.response.release()
    assert (await get_session(daemon, sid))["run_count"] == 51


# ----- output between runs --------------------------------------------------------------------


async def test_output_between_runs_arrives_after_the_next_init(daemon: Daemon, tmp_path: Path) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    go, done = tmp_path / "go", tmp_path / "done"
    # The job waits for the test's go-ahead, so its output surely arrives while no run is on.
    first = await daemon.run(
        sid, f"(while [ ! -e {go} ]; do sleep 0.01; done; echo late; echo late-err >&2; touch {done}) &"
    )
    assert first.stdout == ""
    go.touch()
    await wait_for(done.exists)
    await daemon.client.get("/healthz")  # a round trip lets the daemon drain the pipes
    second = await daemon.run(sid, "echo own")
    types = [(e.type, e.data.get("between_runs", False)) for e in second.events]
    assert types[0] == ("init", False)
    between = [e for e in second.events if e.data.get("between_runs")]
    assert {e.type for e in between} == {"stdout", "stderr"}
    assert "".join(e.data["text"] for e in between if e.type == "stdout") == "late\n"
    assert "".join(e.data["text"] for e in between if e.type == "stderr") == "late-err\n"
    # Between-runs events come right after init, before the run's own output.
    assert [e.data.get("between_runs", False) for e in second.events[1 : 1 + len(between)]] == [True] * len(between)
    own = [e for e in second.of("stdout") if not e.data.get("between_runs")]
    assert "".join(e.data["text"] for e in own) == "own\n"
    assert all("dropped_bytes" not in e.data for e in between)
    third = await daemon.run(sid, "true")
    assert not [e for e in third.events if e.data.get("between_runs")]


async def test_output_between_runs_does_not_count_toward_the_output_limit(
    make_daemon: DaemonFactory, tmp_path: Path
) -> None:
    daemon = await make_daemon(max_output_bytes=10)
    session = await daemon.create()
    sid = session["session_id"]
    go, done = tmp_path / "go", tmp_path / "done"
    await daemon.run(sid, f"(while [ ! -e {go} ]; do sleep 0.01; done; echo between-runs-output; touch {done}) &")
    go.touch()
    await wait_for(done.exists)
    await daemon.client.get("/healthz")
    result = await daemon.run(sid, "echo 0123456789abc")
    between = "".join(e.data["text"] for e in result.events if e.data.get("between_runs"))
    own = "".join(e.data["text"] for e in result.of("stdout") if not e.data.get("between_runs"))
    assert between == "between-runs-output\n"
    assert own == "0123456789"
    assert result.complete["output_truncated"] is True


async def test_between_runs_buffer_keeps_the_newest_bytes_and_counts_dropped(
    make_daemon: DaemonFactory, tmp_path: Path
) -> None:
    daemon = await make_daemon(between_runs_bytes=100)
    session = await daemon.create()
    sid = session["session_id"]
    go, done = tmp_path / "go", tmp_path / "done"
    payload = "".join(f"{i:04d}\n" for i in range(200))  # 1000 bytes
    await daemon.run(
        sid,
        f"(while [ ! -e {go} ]; do sleep 0.01; done; printf '%04d\\n' $(seq 0 199); touch {done}) &",
    )
    go.touch()
    await wait_for(done.exists)
    await daemon.client.get("/healthz")
    result = await daemon.run(sid, "true")
    between = [e for e in result.events if e.data.get("between_runs")]
    assert between, result.events
    assert result.events[1] is between[0]
    assert between[0].data["dropped_bytes"] == 900
    assert all("dropped_bytes" not in e.data for e in between[1:])
    assert "".join(e.data["text"] for e in between) == payload[-100:]


# ----- the daemon's wrapper stays invisible: the code runs as if typed at a prompt --------------

# A deadline for runs that a wrapper bug could leave hanging: the test fails instead of stalling.
HANG_GUARD = {"timeout_ms": 3000}


@pytest.mark.parametrize("name", ["name", "attrs", "status", "flags", "seq"])
async def test_run_env_restores_a_variable_whatever_its_name(daemon: Daemon, name: str) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, f"{name}=orig")
    during = await daemon.run(sid, f"bash -c 'echo \"${name}\"'", env={name: "per-run"}, **HANG_GUARD)
    assert during.terminal.type == "execution_complete", during.events
    assert during.stdout == "per-run\n"
    after = await daemon.run(sid, f"declare -p {name}", **HANG_GUARD)
    assert after.stdout == f'declare -- {name}="orig"\n'


async def test_run_env_naming_a_readonly_variable_does_not_end_the_shell(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "set -e; readonly T_RO=fixed")
    result = await daemon.run(sid, 'echo "ran $T_RO"', env={"T_RO": "other"})
    assert result.complete["shell_exited"] is False
    assert (await get_session(daemon, sid))["state"] == "idle"
    assert (await daemon.run(sid, "echo alive")).stdout == "alive\n"


async def test_user_functions_named_like_builtins_do_not_break_the_wrapper(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    names = ["cd", "echo", "printf", "source", "read", "export", "unset", "trap", "shopt", "local"]
    await daemon.run(sid, "".join(f"{n}() {{ builtin printf 'user-{n}\\n'; }}; " for n in names))
    result = await daemon.run(sid, 'builtin echo "$T_FN"; pwd', cwd="/usr", env={"T_FN": "set"}, **HANG_GUARD)
    assert result.stdout == "set\n/usr\n"
    after = await daemon.run(sid, 'builtin echo "${T_FN-unset}"', **HANG_GUARD)
    assert after.stdout == "unset\n"


async def test_err_trap_fires_once_per_failing_command(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "trap 'echo ERR >&2' ERR")
    result = await daemon.run(sid, "false")
    assert result.stderr == "ERR\n"
    assert result.complete["exit_code"] == 1
    assert (await daemon.run(sid, "true")).stderr == ""


async def test_set_x_traces_only_the_users_commands(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "set -x")
    result = await daemon.run(sid, "echo traced", cwd="/usr", env={"T_X": "1"})
    assert result.stdout == "traced\n"
    assert [line.lstrip("+") for line in result.stderr.splitlines()] == [" echo traced"]
    off = await daemon.run(sid, "set +x; echo quiet")
    assert off.stdout == "quiet\n"
    assert (await daemon.run(sid, "echo untraced")).stderr == ""


async def test_set_x_with_an_err_trap_keeps_the_status_and_fires_the_trap_once(daemon: Daemon) -> None:
    # The wrapper's trace and `trap -p ERR` share the status channel with the record.
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "trap 'echo ERR >&2' ERR; set -x")
    result = await daemon.run(sid, "(exit 7)")
    assert result.complete["exit_code"] == 7
    assert result.stderr.splitlines().count("ERR") == 1  # besides the trace of `echo ERR`
    quiet = await daemon.run(sid, "set +x; trap - ERR; true")
    assert quiet.complete["exit_code"] == 0
    assert (await daemon.run(sid, "false")).stderr == ""


async def test_cwd_with_undecodable_bytes_is_reported_with_replacement_characters(
    daemon: Daemon, tmp_path: Path
) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    result = await daemon.run(sid, f"mkdir -p $'{tmp_path}/d\\xff' && cd $'{tmp_path}/d\\xff'", **HANG_GUARD)
    assert result.complete["cwd"] == f"{tmp_path}/d\ufffd"
    assert (await get_session(daemon, sid))["cwd"] == f"{tmp_path}/d\ufffd"
    listed = await (await daemon.client.get("/session")).read()
    assert f"{tmp_path}/d\ufffd".encode() in listed
    assert (await daemon.run(sid, "pwd")).stdout == f"{tmp_path}/d\ufffd\n"


async def test_run_env_under_set_u_naming_an_unset_variable_keeps_the_shell(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "set -u")
    result = await daemon.run(sid, 'echo "new=$T_NEW"', env={"T_NEW": "1"})
    assert result.stdout == "new=1\n"
    assert result.complete["shell_exited"] is False
    assert (await daemon.run(sid, 'echo "${T_NEW-unset} $-"')).stdout.startswith("unset ")


async def test_removing_every_alias_does_not_break_the_session(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "alias ll='echo listed'; unalias -a")
    result = await daemon.run(sid, "ll 2>/dev/null || echo no-ll; echo alive")
    assert result.stdout == "no-ll\nalive\n"
    # Again with a failing status to hand on and every per-run parameter: the line goes twice.
    await daemon.run(sid, "unalias -a; (exit 4)")
    again = await daemon.run(sid, 'echo "$? $T_A $(pwd) $(cat)"', cwd="/usr", env={"T_A": "a"}, stdin="in")
    assert again.stdout == "4 a /usr in\n"
    assert (await daemon.run(sid, 'echo "${T_A-gone}"')).stdout == "gone\n"


async def test_removing_the_aliases_keeps_the_users_alias_expansion_setting(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "shopt -u expand_aliases")
    await daemon.run(sid, "unalias -a")
    assert (await daemon.run(sid, "shopt -q expand_aliases && echo on || echo off")).stdout == "off\n"


async def test_a_shell_that_cannot_get_its_aliases_back_ends_the_run_instead_of_hanging(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "enable -n alias; unalias -a")
    result = await daemon.run(sid, "echo never", **HANG_GUARD)
    assert result.terminal.type == "error" and result.terminal.data["code"] == "SESSION_DIED"
    assert "never" not in result.stdout


async def test_set_e_code_ending_in_a_failing_and_list_keeps_the_shell(daemon: Daemon) -> None:
    # At a prompt, `set -e` ignores a failure before `&&`; the run's status is still that failure.
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "set -e")
    result = await daemon.run(sid, "[[ -e /nonexistent ]] && echo there")
    assert (result.complete["exit_code"], result.complete["shell_exited"]) == (1, False)
    assert (await daemon.run(sid, "echo alive")).stdout == "alive\n"
    failed = await daemon.run(sid, "false; echo not-reached")
    assert (failed.complete["exit_code"], failed.complete["shell_exited"], failed.stdout) == (1, True, "")


async def test_switching_alias_expansion_off_is_kept_for_the_users_code(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "alias hi='echo expanded'; shopt -u expand_aliases")
    result = await daemon.run(
        sid, "shopt -q expand_aliases && echo on || echo off; hi 2>/dev/null || echo not-expanded"
    )
    assert result.stdout == "off\nnot-expanded\n"
    await daemon.run(sid, "shopt -s expand_aliases")
    assert (await daemon.run(sid, "hi")).stdout == "expanded\n"
