"""Sidecar mode (`--target`): the daemon on this machine's root, the "sandbox" a process in mount,
UTS and IPC namespaces of its own, chrooted into a small root with bash and coreutils and no
Python (tests/rootfs.py), the sessions' state dir bind-mounted at the same path inside it, as a
shared emptyDir would be in a pod. Every shell must start in there, and everything the plain suite
promises (interrupts, close, escapee sweeps, daemon death, nothing left) must still hold."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from execd import identity, process
from execd.client import Client, InvalidRequest, SessionStartFailed
from tests import rootfs
from tests.conftest import assert_no_processes
from tests.helpers_control import (
    REPO,
    ServedDaemon,
    free_port,
    healthy,
    reap_zombie_children,
    require_root,
    served,
)

SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/bin:/bin:/sandbox/bin"
SANDBOX_HOST = "sandbox-host"


@dataclass
class Sandbox:
    proc: subprocess.Popen[bytes]
    name: str  # its argv[0]: what the selector matches

    @property
    def selector(self) -> str:
        return f"cmdline:^{self.name} "

    def pid(self) -> int:
        """The chrooted process itself (the unshare wrapper forks nothing: each step execs)."""
        return self.proc.pid

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_root("sidecar mode (setns, chroot, mounts in a private namespace)")
    path = rootfs.build(tmp_path_factory.mktemp("sandbox-root"))
    assert not rootfs.has_python(path)
    (path / "work/file.txt").write_text("hello from the sandbox's root\n")
    (path / "work-link").symlink_to("/work")  # absolute: must resolve inside the root
    os.makedirs(path / "closed", mode=0o700)
    return path


@pytest.fixture
def state_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="execd-sidecar-state-") as path:
        os.chmod(path, 0o755)  # as an emptyDir is (0777): the shells' user must reach its own files
        yield path


def start_sandbox(root: Path, state_dir: str, path: str = SANDBOX_PATH, env: str = "", share: bool = True) -> Sandbox:
    """Mount, UTS and IPC namespaces of its own; the state dir at the same path inside; its own
    hostname and an environment of its own; cwd /work; then exec'd into its root."""
    name = f"sandbox-main-{secrets.token_hex(4)}"
    (root / state_dir.lstrip("/")).mkdir(parents=True, exist_ok=True)
    script = (
        f"{'mount --bind' if share else 'true'} {state_dir} {root}{state_dir} && mount -t proc proc {root}/proc"
        f" && mount --rbind /dev {root}/dev && echo {SANDBOX_HOST} > /proc/sys/kernel/hostname"
        f" && exec env -i PATH={path} SANDBOX_VAR=from-the-sandbox HOME=/root {env}"
        f" /usr/sbin/chroot {root} /bin/bash -c 'cd /work && exec -a {name} /bin/sleep 100000'"
    )
    proc = subprocess.Popen(
        ["unshare", "--mount", "--uts", "--ipc", "--propagation", "private", "--", "sh", "-c", script],
        start_new_session=True,
    )
    sandbox = Sandbox(proc, name)
    deadline = time.monotonic() + 10
    while not _argv0(proc.pid).startswith(name):
        assert proc.poll() is None and time.monotonic() < deadline, "the sandbox did not start"
        time.sleep(0.02)
    return sandbox


def _argv0(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return ""


@pytest.fixture
def sandbox(root: Path, state_dir: str) -> Iterator[Sandbox]:
    started = start_sandbox(root, state_dir)
    yield started
    started.stop()


def sidecar(sandbox: Sandbox, state_dir: str, *extra: str) -> contextlib.AbstractContextManager[ServedDaemon]:
    return served(
        "--target", sandbox.selector, "--state-dir", state_dir, "--run-as", "sandbox", "--interrupt-grace-ms", "500",
        *extra,
    )  # fmt: skip


def test_sidecar_shells_live_in_the_targets_root_namespaces_and_environment(sandbox: Sandbox, state_dir: str) -> None:
    with sidecar(sandbox, state_dir) as daemon, Client(daemon.url) as client:
        health = client.healthz()
        assert health["target"] == {"selector": sandbox.selector, "pid": sandbox.pid()}
        with client.create_session() as session:
            info = session.refresh()
            assert info["cwd"] == "/work"  # the target's cwd
            assert info["user"] == "sandbox"  # a name only the sandbox's /etc/passwd has
            result = session.run(
                ". /etc/os-release; echo $ID; cat file.txt; echo $PATH; echo $SANDBOX_VAR; id -u; id -G;"
                " cat /proc/sys/kernel/hostname; command -v python3 || echo no-python;"
                " readlink /proc/$$/ns/mnt /proc/$$/ns/uts /proc/$$/ns/ipc"
            )
    assert result.exit_code == 0, result
    lines = result.stdout.splitlines()
    assert lines[:9] == [
        rootfs.MARKER,
        "hello from the sandbox's root",
        SANDBOX_PATH,
        "from-the-sandbox",
        "1000",
        "1000 1500",  # `extra` lists sandbox as a member, in the sandbox's /etc/group
        SANDBOX_HOST,
        "no-python",
        os.readlink(f"/proc/{sandbox.pid()}/ns/mnt"),
    ]
    assert lines[9:] == [os.readlink(f"/proc/{sandbox.pid()}/ns/{ns}") for ns in ("uts", "ipc")]
    assert lines[8] != os.readlink("/proc/self/ns/mnt")


def test_sidecar_paths_and_users_are_the_targets(sandbox: Sandbox, state_dir: str) -> None:
    with sidecar(sandbox, state_dir) as daemon, Client(daemon.url) as client:
        with pytest.raises(InvalidRequest, match="is not a directory"):
            client.create_session(cwd=str(REPO))  # there on this machine, not in the sandbox
        with pytest.raises(InvalidRequest, match="may not enter"):
            client.create_session(cwd="/closed")  # 0700 root in the sandbox's root
        with pytest.raises(InvalidRequest, match="no user named"):
            client.create_session(user="nobody-here")
        with client.create_session(cwd="/work-link") as session:  # an absolute link, followed inside
            assert session.run("pwd -P; cat file.txt").stdout == "/work\nhello from the sandbox's root\n"
            with pytest.raises(InvalidRequest, match="is not a directory"):
                session.run("true", cwd=str(REPO))
        with client.create_session(user="root") as session:
            assert session.run("id -u; pwd").stdout == "0\n/work\n"


def test_sidecar_interrupts_and_timeouts_reach_the_run(sandbox: Sandbox, state_dir: str) -> None:
    with sidecar(sandbox, state_dir) as daemon, Client(daemon.url) as client, client.create_session() as session:
        timed = session.run("sleep 100", timeout_ms=300)
        assert (timed.exit_code, timed.interrupted, timed.timed_out) == (130, True, True)
        started = session.start("trap '' INT; sleep 100")  # ignores SIGINT: the ladder's SIGKILL ends it
        time.sleep(0.3)
        session.interrupt(run_id=started["run_id"])
        ended = session.wait(started["run_id"])
        assert ended.interrupted and ended.exit_code == 130
        assert session.run("echo still here").stdout == "still here\n"


def test_sidecar_close_kills_the_sessions_escapees(sandbox: Sandbox, state_dir: str) -> None:
    with sidecar(sandbox, state_dir) as daemon, Client(daemon.url) as client:
        session = client.create_session()
        session.run("sleep 1000 & setsid sleep 1000 & (setsid sleep 1000 &) ; true")
        assert len(_tagged({session.id})) >= 4  # the shell and three sleeps
        session.close()
        assert_no_processes({session.id})


def test_sidecar_daemon_death_leaves_nothing(sandbox: Sandbox, state_dir: str) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "execd", "serve", "--host", "127.0.0.1", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXECD_")}
    proc = subprocess.Popen(
        [*argv, "--target", sandbox.selector, "--state-dir", state_dir, "--run-as", "sandbox"], cwd=REPO, env=env
    )
    ids = set()
    try:
        deadline = time.monotonic() + 15
        while not healthy(port):
            assert proc.poll() is None and time.monotonic() < deadline, "the daemon did not come up"
            time.sleep(0.05)
        with Client(f"http://127.0.0.1:{port}") as client:
            for _ in range(2):
                session = client.create_session()
                session.run("sleep 1000 & (setsid sleep 1000 &); true")
                ids.add(session.id)
        assert len(_tagged(ids)) >= 6
        watchdog = next(c.pid for c in psutil.Process(proc.pid).children() if "watchdog" in " ".join(c.cmdline()))
    finally:
        proc.kill()
        proc.wait()
    # The watchdog's work. What the dead daemon had as children (the watchdog, the shells) re-parents
    # to the nearest subreaper: this test process, once an in-process daemon of an earlier test made
    # it one; so they are reaped here as they end.
    deadline = time.monotonic() + 10
    while _tagged(ids) or os.listdir(state_dir) or psutil.pid_exists(watchdog):
        assert time.monotonic() < deadline, (_tagged(ids), os.listdir(state_dir))
        reap_zombie_children()
        time.sleep(0.02)
    assert_no_processes(ids)  # the private files are gone from the shared dir too (the loop above)


def test_sidecar_follows_a_restarted_target(root: Path, state_dir: str) -> None:
    first = start_sandbox(root, state_dir)
    name = "sandbox-main-"
    try:
        with (
            served("--target", f"cmdline:^{name}", "--state-dir", state_dir, "--run-as", "sandbox") as daemon,
            Client(daemon.url) as client,
        ):
            with client.create_session() as session:
                assert session.run("echo $SANDBOX_VAR").stdout == "from-the-sandbox\n"
            first.stop()
            assert client.healthz()["target"]["pid"] is None  # the daemon is healthy, its target gone
            with pytest.raises(SessionStartFailed, match="no process matches"):
                client.create_session()
            second = start_sandbox(root, state_dir)
            try:
                assert client.healthz()["target"]["pid"] == second.pid()
                with client.create_session() as session:
                    assert session.run("readlink /proc/$$/ns/mnt").stdout.strip() == os.readlink(
                        f"/proc/{second.pid()}/ns/mnt"
                    )
            finally:
                second.stop()
    finally:
        first.stop()


def test_sidecar_a_shell_that_cannot_start_says_why(root: Path, state_dir: str) -> None:
    sandbox = start_sandbox(root, state_dir, path="/nowhere")  # bash is not on the sandbox's PATH
    try:
        with sidecar(sandbox, state_dir) as daemon, Client(daemon.url) as client:
            with pytest.raises(SessionStartFailed, match="bash: not found on PATH '/nowhere'"):
                client.create_session()
            assert client.list_sessions() == []
    finally:
        sandbox.stop()


CAPABILITIES = "grep -E '^(NoNewPrivs|CapInh|CapPrm|CapEff|CapBnd|CapAmb)' /proc/self/status"
NO_CAPABILITIES = [f"{name}:\t0000000000000000" for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")]


@pytest.mark.parametrize("escalation", [False, True], ids=["default", "allow-privilege-escalation"])
@pytest.mark.parametrize("user", ["sandbox", "root"])
def test_sidecar_shells_hold_no_capability_even_as_root(
    sandbox: Sandbox, state_dir: str, user: str, escalation: bool
) -> None:
    # The daemon holds SYS_ADMIN and the rest; a shell in the sandbox, root or not, holds none and
    # can gain none, whatever the sandbox's files say. --allow-privilege-escalation lifts only
    # no_new_privs (setuid binaries switch users), never the empty capability sets.
    flags = ["--allow-privilege-escalation"] if escalation else []
    with (
        sidecar(sandbox, state_dir, *flags) as daemon,
        Client(daemon.url) as client,
        client.create_session(user=user) as session,
    ):
        lines = session.run(CAPABILITIES).stdout.splitlines()
    assert lines == [*NO_CAPABILITIES, f"NoNewPrivs:\t{0 if escalation else 1}"], lines


def test_sidecar_the_targets_environment_never_reaches_the_root_spawner(root: Path, state_dir: str) -> None:
    # The sandbox chooses its environment. ld.so obeys LD_DEBUG in any process it starts: a log
    # file written on this machine's side would be the root spawner's, one in the sandbox is bash's.
    mark = f"execd-lddebug-{secrets.token_hex(4)}"
    sandbox = start_sandbox(root, state_dir, env=f"LD_DEBUG=libs LD_DEBUG_OUTPUT=/tmp/{mark}")
    before = set(Path("/tmp").glob(f"{mark}.*"))  # the sandbox's own start (env, chroot) ran here
    try:
        with sidecar(sandbox, state_dir) as daemon, Client(daemon.url) as client, client.create_session() as s:
            assert s.run("echo $LD_DEBUG").stdout == "libs\n"  # the shells have it
        assert list((root / "tmp").glob(f"{mark}.*")), "bash in the sandbox should have logged"
        assert set(Path("/tmp").glob(f"{mark}.*")) == before, "the spawner ran with the sandbox's environment"
    finally:
        sandbox.stop()
        for log in Path("/tmp").glob(f"{mark}.*"):
            log.unlink()


def test_sidecar_session_code_cannot_pose_as_the_target(sandbox: Sandbox, state_dir: str) -> None:
    with sidecar(sandbox, state_dir) as daemon, Client(daemon.url) as client, client.create_session() as session:
        # A process with the sandbox's command line and no tag, left behind, then the real one gone.
        session.run(f"(env -i bash -c 'exec -a {sandbox.name} /bin/sleep 100000' &); true")
        sandbox.stop()
        with pytest.raises(SessionStartFailed, match="no process matches"):
            client.create_session()
        assert client.healthz()["target"]["pid"] is None


def test_the_spawner_refuses_a_pid_that_is_no_longer_the_target() -> None:
    # The pid is checked against its start time once its namespaces are open: a pid reused between
    # the lookup and the spawn is refused, not entered.
    sleeper = subprocess.Popen(["sleep", "100"])
    try:
        start = process.start_ticks(sleeper.pid)
        assert start is not None
        spawner = process.helper_command("enter")
        done = subprocess.run(
            [*spawner, "--target", f"{sleeper.pid}:{start + 1}", "--", "true"], capture_output=True, text=True
        )
    finally:
        sleeper.kill()
        sleeper.wait()
    assert done.returncode == 126
    assert done.stderr.strip() == f"execd: the shell could not start: the target process {sleeper.pid} has ended"


def test_a_number_names_a_uid_never_a_user_of_that_name(tmp_path: Path) -> None:
    # A sandbox's /etc/passwd may hold a user *named* 1000 with uid 0: `--run-as 1000` is uid 1000.
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("1000:x:0:0::/root:/bin/sh\nsandbox:x:1001:1001::/home/s:/bin/sh\n")
    (tmp_path / "etc/group").write_text("0:x:1500:\nsandbox:x:1001:\n")
    accounts = identity.Accounts(str(tmp_path))
    assert accounts.user("1000") is None  # no uid 1000: the number is then taken as it is
    assert accounts.user("1001") == (1001, 1001, "sandbox", "/home/s")
    assert accounts.group_id("0") == 0


def test_a_target_whose_accounts_are_a_fifo_cannot_hang_the_daemon(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    os.mkfifo(tmp_path / "etc/passwd")  # nobody ever writes to it: a blocking open would never return
    (tmp_path / "etc/group").symlink_to("/dev/zero")  # endless: never read
    accounts = identity.Accounts(str(tmp_path))
    assert accounts.user("sandbox") is None
    assert accounts.groups_of("sandbox", 1000) == (1000,)


def test_the_targets_accounts_are_read_inside_its_root(tmp_path: Path) -> None:
    # An absolute link in the sandbox (/etc/passwd -> /srv/passwd) is followed inside its root, not
    # to this machine's /srv or /etc.
    (tmp_path / "etc").mkdir()
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv/passwd").write_text("inside:x:4242:4242::/home/inside:/bin/sh\n")
    (tmp_path / "etc/passwd").symlink_to("/srv/passwd")
    accounts = identity.Accounts(str(tmp_path))
    assert accounts.user("inside") == (4242, 4242, "inside", "/home/inside")
    assert accounts.user("root") is None  # this machine's root is not the sandbox's
    assert identity.real_path("/etc/passwd", str(tmp_path)) == "/srv/passwd"


def test_sidecar_a_state_dir_the_target_does_not_share_is_named(root: Path, state_dir: str) -> None:
    sandbox = start_sandbox(root, state_dir, share=False)  # the pod's emptyDir not mounted there
    try:
        missing = pytest.raises(SessionStartFailed, match="is not in the target's root: mount --state-dir")
        with sidecar(sandbox, state_dir) as daemon, Client(daemon.url) as client, missing:
            client.create_session()
    finally:
        sandbox.stop()


@pytest.mark.parametrize("selector", ["nothing", "pid:0", "pid:x", "cmdline:(", "where:1"])
def test_target_selector_that_means_nothing_stops_the_daemon(selector: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "execd", "serve", "--port", "0", "--target", selector],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "--target (EXECD_TARGET)" in done.stderr and len(done.stderr.splitlines()) == 1


def _tagged(ids: set[str]) -> list[int]:
    from tests.conftest import tagged_processes

    return [p.pid for p in tagged_processes(ids)]


POD = """
set -e
state=$1 root=$2 token=$3; shift 3
# The pod: its own pid namespace (shareProcessNamespace) and mounts; /run a fresh tmpfs. The state
# emptyDir is mounted where the execd container mounts it, the Secret where execd reads the token.
mount -t tmpfs tmpfs /run
mkdir -p "$EXECD_STATE_AT" "$(dirname "$TOKEN_AT")" "$root$SANDBOX_STATE_AT"
mount --bind "$state" "$EXECD_STATE_AT"
printf %s "$token" > "$TOKEN_AT" && chmod 0400 "$TOKEN_AT"
# The sandbox container: mount, UTS and IPC namespaces of its own, the emptyDir where the manifest
# mounts it there, its image's root, its user, its working directory, its command.
unshare --mount --uts --ipc --propagation private -- sh -c '
  mount --bind "$4" "$0$5" && mount -t proc proc "$0/proc" && mount --rbind /dev "$0/dev" &&
  exec chroot --userspec="$1" "$0" /bin/sh -c "cd \\"\\$0\\" && exec $3" "$2"
' "$root" "$SANDBOX_USER" "$SANDBOX_WORKDIR" "$SANDBOX_COMMAND" "$state" "$SANDBOX_STATE_AT" &
# The execd container: the manifest's arguments, verbatim. This shell stays the pod's init (its
# "pause"): the two containers are siblings, as in a pod.
"$@" &
wait
"""


def test_the_sidecar_manifest_works_as_written(root: Path, state_dir: str) -> None:
    # deploy/kubernetes/sidecar.yaml in a simulated pod: one pid namespace for both "containers",
    # the sandbox container's command, user and working directory, and execd's arguments verbatim
    # (--target, --state-dir, --run-as, --access-token-file). Only the port comes from EXECD_PORT.
    documents = yaml.safe_load_all((REPO / "deploy/kubernetes/sidecar.yaml").read_text())
    spec = next(d for d in documents if d and d.get("kind") == "Pod")["spec"]
    assert spec["shareProcessNamespace"] is True
    containers = {c["name"]: c for c in spec["containers"]}
    sandbox, execd = containers["sandbox"], containers["execd"]
    security = sandbox["securityContext"]
    (root / sandbox["workingDir"].lstrip("/")).mkdir(parents=True, exist_ok=True)
    os.chown(root / sandbox["workingDir"].lstrip("/"), security["runAsUser"], security["runAsGroup"])
    token, port = secrets.token_hex(16), free_port()
    state_volume = next(m["name"] for m in execd["volumeMounts"] if m["mountPath"] == _arg(execd, "--state-dir"))
    sandbox_state_at = next(m["mountPath"] for m in sandbox["volumeMounts"] if m["name"] == state_volume)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXECD_")}
    env.update(
        EXECD_PORT=str(port),
        EXECD_HOST="127.0.0.1",
        SANDBOX_USER=f"{security['runAsUser']}:{security['runAsGroup']}",
        SANDBOX_WORKDIR=sandbox["workingDir"],
        SANDBOX_COMMAND=" ".join(sandbox["command"]),
        EXECD_STATE_AT=_arg(execd, "--state-dir"),
        SANDBOX_STATE_AT=sandbox_state_at,
        TOKEN_AT=_arg(execd, "--access-token-file"),
        **{e["name"]: e["value"] for e in execd.get("env", [])},
    )
    daemon = [sys.executable, "-m", "execd", "serve", *execd["args"]]
    pod = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "--", "sh", "-c", POD, "pod", state_dir,
         str(root), token, *daemon],
        cwd=REPO, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while not healthy(port):
            assert pod.poll() is None and time.monotonic() < deadline, "the pod's execd did not come up"
            time.sleep(0.05)
        with Client(f"http://127.0.0.1:{port}", token=token) as client:
            while (target := client.healthz()["target"])["pid"] is None:  # the sandbox is starting
                assert time.monotonic() < deadline, target
                time.sleep(0.05)
            assert target["selector"] == _arg(execd, "--target")
            with client.create_session() as session:
                ran = session.run("id -u; pwd; . /etc/os-release; echo $ID; ls /run/execd | wc -l")
                assert ran.stdout.splitlines()[:3] == [str(security["runAsUser"]), sandbox["workingDir"], rootfs.MARKER]
                session.run("sleep 1000 & (setsid sleep 1000 &); true")
                ids = {session.id}
        assert_no_processes(ids)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pod.pid, signal.SIGKILL)  # unshare, then (--kill-child) the pod's init and all
        pod.wait(timeout=30)
        shutil.rmtree(root / sandbox["workingDir"].lstrip("/"), ignore_errors=True)


def _arg(container: dict[str, Any], flag: str) -> str:
    args: list[str] = container["args"]
    return args[args.index(flag) + 1]
