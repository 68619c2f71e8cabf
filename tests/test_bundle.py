"""The one-dir bundle (scripts/bundle) in a root with bash and no Python, as in a bare sandbox image.

Built once per test session with the real script (a venv of its own, a pinned PyInstaller), then run
under `chroot` in private mount and pid namespaces (the network namespace is shared, so the test
reaches it on 127.0.0.1; the mounts and every process die with the namespaces). Real processes, real
HTTP, no mocks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
import yaml

import execd
from execd import frozen
from execd.client import Client
from tests import rootfs
from tests.helpers_control import free_port, healthy, is_live, kill_tagged, require_root, session_processes

REPO = Path(__file__).resolve().parent.parent
BUNDLE_NAME = f"execd-{execd.__version__}-linux-{os.uname().machine}"
MAX_BYTES = 40_000_000  # the budget: 40 MB on disk
INSTALL = "/opt/execd"  # where the bundle goes in the root
BUILD_TIMEOUT_S = 900  # a fresh clone: a venv, PyInstaller and the project's dependencies from PyPI
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Bundle:
    path: Path
    build_s: float
    report: dict[str, Any]  # scripts/bundle.py --json


@pytest.fixture(scope="session")
def bundle() -> Iterator[Bundle]:
    out = Path(tempfile.mkdtemp(prefix="execd-bundle-"))
    try:
        started = time.monotonic()
        built = subprocess.run(
            [str(REPO / "scripts" / "bundle"), "--out", str(out)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
        build_s = time.monotonic() - started
        assert built.returncode == 0, f"scripts/bundle failed:\n{built.stdout}\n{built.stderr[-6000:]}"
        path = out / BUNDLE_NAME
        assert str(path) in built.stdout and "musl" in built.stdout, built.stdout  # what it prints at the end
        report = json.loads(
            subprocess.run(
                [sys.executable, str(REPO / "scripts" / "bundle.py"), str(path), "--json"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        yield Bundle(path, build_s, report)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def say(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n[bundle] {text}")


# ----- the bundle itself ------------------------------------------------------------------------


@pytest.mark.timeout(BUILD_TIMEOUT_S + 120)
def test_the_bundle_fits_the_budget_and_knows_its_version(bundle: Bundle, capsys: pytest.CaptureFixture[str]) -> None:
    report = bundle.report
    say(
        capsys,
        f"{bundle.path.name}: {report['megabytes']} MB, {report['files']} files, needs glibc >= "
        f"{report['min_glibc']} ({report['needed_by'][0]}); built in {bundle.build_s:.0f} s",
    )
    assert report["bytes_on_disk"] <= MAX_BYTES, report
    assert (bundle.path / "execd").is_file() and os.access(bundle.path / "execd", os.X_OK)
    assert (bundle.path / "_internal" / "execd" / "bootstrap.sh").is_file()  # the shells' wrapper
    # One-dir, no interpreter: libpython is loaded by the bootloader, nothing is unpacked at start.
    assert not [p for p in bundle.path.rglob("python*") if p.is_file()]
    # What the binary's own glibc needs is no more than this machine has (it was built here).
    host = tuple(int(x) for x in (os.confstr("CS_GNU_LIBC_VERSION") or "glibc 0.0").split()[1].split(".")[:2])
    assert tuple(int(x) for x in report["min_glibc"].split(".")) <= host, report
    # The image needs glibc and nothing else: every other library the bundle links is in it (the
    # bootloader's libz.so.1 too, through the run path scripts/bundle gives it).
    assert report["from_the_image"] and not report["not_glibc"], report
    version = subprocess.run(
        [str(bundle.path / "execd"), "--version"], capture_output=True, text=True, timeout=30, check=True
    )
    assert version.stdout.strip() == f"execd {execd.__version__}", version


# ----- the environment scrub, without a bundle ----------------------------------------------------

LIB = "/opt/execd/_internal"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        # None before: the bootloader set only its own directory.
        (
            {"LD_LIBRARY_PATH": LIB, "_PYI_ARCHIVE_FILE": "/opt/execd/execd", "_PYI_PARENT_PROCESS_LEVEL": "1"},
            {},
        ),
        # One before: put first, the original saved in LD_LIBRARY_PATH_ORIG.
        (
            {"LD_LIBRARY_PATH": f"{LIB}:/usr/local/lib", "LD_LIBRARY_PATH_ORIG": "/usr/local/lib", "HOME": "/root"},
            {"LD_LIBRARY_PATH": "/usr/local/lib", "HOME": "/root"},
        ),
        # A user's own LD_LIBRARY_PATH_ORIG, with no LD_LIBRARY_PATH: kept.
        ({"LD_LIBRARY_PATH": LIB, "LD_LIBRARY_PATH_ORIG": "/mine"}, {"LD_LIBRARY_PATH_ORIG": "/mine"}),
        # Changed since by someone else (not the bundle's directory first): left alone.
        ({"LD_LIBRARY_PATH": "/elsewhere", "_MEIPASS2": LIB}, {"LD_LIBRARY_PATH": "/elsewhere"}),
    ],
)
def test_original_environ_undoes_exactly_what_the_bootloader_did(
    given: dict[str, str], expected: dict[str, str]
) -> None:
    assert frozen.original_environ(given, library_dir=LIB) == expected


def test_original_environ_outside_a_bundle_is_the_environment_unchanged() -> None:
    assert not frozen.is_frozen()
    assert frozen.original_environ() == dict(os.environ)
    assert frozen.original_environ({"LD_LIBRARY_PATH": LIB}) == {"LD_LIBRARY_PATH": LIB}


# ----- in a root without Python -----------------------------------------------------------------


@pytest.fixture(scope="module")
def root(bundle: Bundle) -> Iterator[Path]:
    """A root with bash and coreutils, no Python, and the bundle in /opt/execd."""
    require_root("a root of bash and coreutils, entered with chroot in namespaces of its own")
    path = Path(tempfile.mkdtemp(prefix="execd-bundle-root-"))
    try:
        rootfs.build(path)
        add_the_c_library(path, bundle)
        assert not rootfs.has_python(path)
        shutil.copytree(bundle.path, path / INSTALL.lstrip("/"), symlinks=True)
        yield path
    finally:
        # Mounts exist only in the daemon's private mount namespace; never remove through one.
        assert str(path) not in Path("/proc/self/mountinfo").read_text(), "a mount leaked out of the namespace"
        shutil.rmtree(path, ignore_errors=True)


def add_the_c_library(root: Path, bundle: Bundle) -> None:
    """The rest of glibc that the bundle links (libdl, libm, libpthread …), from this machine: the
    root has only what bash and coreutils link, where every glibc image has its whole C library."""
    needed = set(bundle.report["from_the_image"])
    for elf in elf_files(bundle.path):
        listed = subprocess.run(
            ["ldd", str(elf)],
            env={"LD_LIBRARY_PATH": str(bundle.path / "_internal")},
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        for library in _LIBRARY.findall(listed):
            target = root / library.lstrip("/")
            if os.path.basename(library) in needed and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(os.path.realpath(library), target)


_LIBRARY = re.compile(r"(/\S+) \(0x")


def elf_files(top: Path) -> list[Path]:
    with_magic = []
    for path in top.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as f:
                if f.read(4) == b"\x7fELF":
                    with_magic.append(path)
    return with_magic


@dataclasses.dataclass
class Chrooted:
    """`execd serve` from the bundle, chrooted into `root`, in private mount and pid namespaces.

    The namespace's init is a shell that mounts /proc and /dev, runs the daemon in the foreground
    (not as init: a killed init would take everything along, and the watchdog would prove nothing),
    says how it ended, then waits until the test kills the namespace."""

    proc: subprocess.Popen[bytes]  # unshare: its death kills the namespace's init, and so all of it
    port: int
    log: Path
    daemon: psutil.Process  # as the host sees it
    healthy_after_s: float

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def watchdog(self) -> psutil.Process:
        return poll(
            lambda: next((c for c in self.daemon.children() if "_watchdog" in c.cmdline()), None),
            what=f"the daemon's _watchdog process: {self.log_text()}",
        )

    def exit_status(self) -> int:
        found = poll(lambda: re.search(r"daemon exited (\d+)", self.log_text()), what="the daemon's exit")
        return int(found.group(1))


INIT = """
root=$1 userspec=$2 workdir=$3; shift 3
mount -t proc proc "$root/proc" && mount --rbind /dev "$root/dev" || exit 125
if [ -d "$root/execd" ]; then mount --bind "$root/opt/execd" "$root/execd" || exit 125; fi
chroot --userspec="$userspec" "$root" /bin/sh -c 'cd "$0" && exec "$@"' "$workdir" "$@"
echo "daemon exited $?"
while sleep 3600; do :; done
"""


@contextlib.contextmanager
def chrooted(
    root: Path,
    *args: str,
    command: Sequence[str] = (),
    user: str = "0:0",
    workdir: str = "/",
    env: Mapping[str, str] | None = None,
) -> Iterator[Chrooted]:
    """The bundle's `execd serve ARGS` on a free port; or `command` as it is (a manifest's), as
    `user`, in `workdir`, with the port in EXECD_PORT."""
    port = free_port()
    fd, name = tempfile.mkstemp(prefix="execd-bundle-", suffix=".log")
    os.close(fd)
    log = Path(name)
    # What a container runtime would give: no LD_LIBRARY_PATH, no PYTHON*, nothing of this test's.
    base = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/root", "EXECD_PORT": str(port)}
    program = list(command) or [f"{INSTALL}/execd", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    namespaces = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--"]
    command = [*namespaces, "sh", "-c", INIT, "init", str(root), user, workdir, *program]
    env = {**base, **(env or {})}
    with log.open("wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        while not healthy(port, timeout=0.5):
            text = log.read_text(errors="replace")
            assert proc.poll() is None and "daemon exited" not in text, f"the daemon ended at start: {text}"
            assert time.perf_counter() - started < 30, f"no /healthz within 30 s: {text}"
            time.sleep(0.005)
        healthy_after_s = time.perf_counter() - started
        daemon = poll(lambda: _daemon_of(proc.pid), what="the daemon's process")
        yield Chrooted(proc, port, log, daemon, healthy_after_s)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # unshare, then (--kill-child) the namespace's init
        proc.wait(timeout=30)
        poll(lambda: not _namespace_alive(proc.pid), timeout=15, what="the namespace's processes gone")
        log.unlink()


def _daemon_of(unshare_pid: int) -> psutil.Process | None:
    with contextlib.suppress(psutil.Error):
        for proc in psutil.Process(unshare_pid).children(recursive=True):
            if proc.cmdline()[0].endswith("/execd") and proc.cmdline()[1:2] == ["serve"]:
                return proc
    return None


def _namespace_alive(unshare_pid: int) -> bool:
    try:
        return any(is_live(p.pid) for p in psutil.Process(unshare_pid).children(recursive=True))
    except psutil.Error:
        return False


def poll(condition: Callable[[], T | None], timeout: float = 10.0, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.01)


def processes_named(session_id: str, name: str) -> list[psutil.Process]:
    found = []
    for proc in session_processes(session_id):
        with contextlib.suppress(psutil.Error):
            if proc.name() == name:
                found.append(proc)
    return found


@pytest.mark.timeout(BUILD_TIMEOUT_S + 180)
def test_the_bundle_serves_in_a_root_without_python(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids: set[str] = set()
    try:
        # Every shell runs as uid 1000: the root has no setpriv, so each goes through `execd _enter`.
        with chrooted(root, "--run-as", "1000") as daemon, Client(daemon.url) as client:
            say(capsys, f"start to first 200 of /healthz: {daemon.healthy_after_s * 1000:.0f} ms")
            assert client.healthz()["status"] == "ok"
            assert not rootfs.has_python(root)

            with client.create_session() as sandbox:
                ids.add(sandbox.id)
                assert sandbox.run("id -u").stdout == f"{rootfs.SANDBOX_UID}\n"
                assert rootfs.MARKER in sandbox.run("cat /etc/os-release").stdout
                missing = sandbox.run("command -v python3 python; echo status=$?")
                assert missing.stdout == "status=1\n", missing
                # Neither the bundle's library path nor its bookkeeping reaches the shell.
                scrubbed = sandbox.run('echo "[$LD_LIBRARY_PATH]"; env | grep -c -e "^_PYI_" -e "^LD_LIBRARY_PATH"')
                assert scrubbed.stdout == "[]\n0\n", scrubbed
                # The client's commands, from the same binary, inside the root.
                listed = sandbox.run(f"{INSTALL}/execd sessions --url {daemon.url} --json")
                assert listed.exit_code == 0 and sandbox.id in listed.stdout, listed

                # An interrupt ends the run as interrupted; the shell lives on.
                started = sandbox.start("sleep 100", run_id="nap")
                assert started["run_id"] == "nap"
                poll(lambda: processes_named(sandbox.id, "sleep"), what="the run's sleep")
                sandbox.interrupt()
                result = sandbox.wait("nap")
                assert result.interrupted and result.exit_code == 130, result
                assert sandbox.run("echo alive").stdout == "alive\n"

                # DELETE leaves nothing tagged with the session's id.
                sandbox.run("sleep 1000 & sleep 1001 </dev/null >/dev/null 2>&1 &")
                poll(lambda: len(processes_named(sandbox.id, "sleep")) == 2, what="both jobs' sleep")
            assert not session_processes(sandbox.id), "DELETE answered before the session's processes died"

            # A session of the daemon's own user: bash spawned directly, with the daemon's environment.
            with client.create_session(user="root") as own:
                ids.add(own.id)
                assert own.run("id -u").stdout == "0\n"
                scrubbed = own.run('echo "[$LD_LIBRARY_PATH]"; env | grep -c -e "^_PYI_" -e "^LD_LIBRARY_PATH"')
                assert scrubbed.stdout == "[]\n0\n", scrubbed

            daemon.daemon.send_signal(signal.SIGTERM)
            assert daemon.exit_status() == 0, daemon.log_text()
    finally:
        leftovers = kill_tagged(ids)
    assert not leftovers, f"processes of the bundle's sessions outlived it: {leftovers}"


@pytest.mark.timeout(BUILD_TIMEOUT_S + 180)
def test_the_bundles_watchdog_kills_the_sessions_of_a_killed_daemon(root: Path) -> None:
    ids: set[str] = set()
    try:
        with chrooted(root) as daemon, Client(daemon.url) as client:
            watchdog = daemon.watchdog()
            assert watchdog.cmdline()[:2] == [f"{INSTALL}/execd", "_watchdog"]
            session = client.create_session()
            ids.add(session.id)
            session.run("sleep 1000 &")
            sleeper = poll(lambda: processes_named(session.id, "sleep"), what="the session's sleep")[0]
            daemon.daemon.send_signal(signal.SIGKILL)
            assert daemon.exit_status() == 128 + signal.SIGKILL
            poll(lambda: not is_live(sleeper.pid), what="the sleep killed by the watchdog")
            poll(lambda: not session_processes(session.id), what="nothing of the session left")
            poll(lambda: not is_live(watchdog.pid), what="the watchdog's exit after its sweep")
    finally:
        leftovers = kill_tagged(ids)
    assert not leftovers, f"processes of the killed daemon's sessions outlived the watchdog: {leftovers}"


def manifest_container(file: str, name: str) -> dict[str, Any]:
    documents = yaml.safe_load_all((REPO / "deploy" / "kubernetes" / file).read_text())
    pod = next(d for d in documents if d and d.get("kind") == "Pod")
    container: dict[str, Any] = next(c for c in pod["spec"]["containers"] if c["name"] == name)
    context = {**pod["spec"].get("securityContext", {}), **container.get("securityContext", {})}
    return {**container, "securityContext": context}


@pytest.mark.timeout(BUILD_TIMEOUT_S + 180)
def test_the_injection_manifests_command_runs_as_written(root: Path) -> None:
    # The sandbox container of deploy/kubernetes/injection.yaml, as a runtime would start it: its
    # command line verbatim (the bundle at the emptyDir's /execd, the original command after --), its
    # user, working directory and environment, the token where the Secret is mounted. Only the port
    # differs (EXECD_PORT): the test cannot take 44772.
    sandbox = manifest_container("injection.yaml", "sandbox")
    user = f"{sandbox['securityContext']['runAsUser']}:{sandbox['securityContext']['runAsGroup']}"
    token_path = sandbox["command"][sandbox["command"].index("--access-token-file") + 1]
    token = secrets.token_hex(16)
    for directory in ("execd", token_path.rsplit("/", 1)[0].lstrip("/"), sandbox["workingDir"].lstrip("/")):
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / token_path.lstrip("/")).write_text(token)
    os.chown(root / token_path.lstrip("/"), 1000, 1000)
    os.chown(root / sandbox["workingDir"].lstrip("/"), 1000, 1000)
    env = {e["name"]: e["value"] for e in sandbox.get("env", [])}
    ids: set[str] = set()
    try:
        with chrooted(root, command=sandbox["command"], user=user, workdir=sandbox["workingDir"], env=env) as daemon:
            probe = sandbox["readinessProbe"]["httpGet"]["path"]
            assert probe == "/healthz" and healthy(daemon.port)
            original = poll(
                lambda: next((c for c in daemon.daemon.children() if c.cmdline() == ["sleep", "infinity"]), None),
                what="the image's own command, the daemon's child",
            )
            with Client(daemon.url, token=token) as client, client.create_session() as session:
                ids.add(session.id)
                ran = session.run("id -u; pwd; cat /etc/os-release | grep -c execd-test-rootfs")
                assert ran.stdout == f"1000\n{sandbox['workingDir']}\n1\n", ran
            daemon.daemon.send_signal(signal.SIGTERM)  # what the kubelet sends at a pod's end
            assert daemon.exit_status() == 128 + signal.SIGTERM  # the original command's, passed on
            assert not is_live(original.pid)
    finally:
        leftovers = kill_tagged(ids)
        for directory in ("execd", "run", sandbox["workingDir"].lstrip("/")):
            shutil.rmtree(root / directory, ignore_errors=True)
    assert not leftovers


@pytest.mark.timeout(BUILD_TIMEOUT_S + 180)
def test_the_bundle_in_sidecar_mode(bundle: Bundle) -> None:
    # As the image runs it beside a sandbox: the bundle's own spawner (`_enter`, re-executed by the
    # bootloader) gets the shell's environment on fd 3, enters the sandbox and drops every capability.
    require_root("sidecar mode (setns, chroot, mounts in a private namespace)")
    from tests.test_sidecar import CAPABILITIES, NO_CAPABILITIES, start_sandbox

    with tempfile.TemporaryDirectory(prefix="execd-bundle-sidecar-") as top:
        os.chmod(top, 0o755)  # the state dir's parents: the shells' user must reach it
        (Path(top) / "root").mkdir()
        sandbox_root, state = rootfs.build(Path(top) / "root"), Path(top) / "state"
        state.mkdir()
        state.chmod(0o755)
        sandbox = start_sandbox(sandbox_root, str(state))
        port = free_port()
        env = {"PATH": os.environ.get("PATH", os.defpath)}
        argv = [str(bundle.path / "execd"), "serve", "--host", "127.0.0.1", "--port", str(port)]
        daemon = subprocess.Popen(
            [*argv, "--target", sandbox.selector, "--state-dir", str(state), "--run-as", "sandbox"], env=env
        )
        try:
            poll(lambda: healthy(port), what="the bundle's /healthz")
            with Client(f"http://127.0.0.1:{port}") as client, client.create_session() as session:
                ran = session.run('id -u; . /etc/os-release; echo $ID; echo "[$LD_LIBRARY_PATH]"')
                assert ran.stdout == f"{rootfs.SANDBOX_UID}\n{rootfs.MARKER}\n[]\n", ran
                assert session.run(CAPABILITIES).stdout.splitlines() == [*NO_CAPABILITIES, "NoNewPrivs:\t1"]
                ids = {session.id}
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=30) == 0
            assert not kill_tagged(ids)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
            sandbox.stop()
