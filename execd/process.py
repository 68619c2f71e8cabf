"""The /proc toolkit: signal a tree, kill a tree, sweep by tag, usage (psutil, imported only there).

Nothing here knows about sessions or HTTP; callers pass pids and tags.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import resource
import select
import signal
import sys
import time
from collections.abc import Iterable, Mapping

from execd.cgroups import SessionCgroups

SESSION_TAG = "EXECD_SESSION_ID"
_PR_SET_CHILD_SUBREAPER = 36
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


_PR_GET_CHILD_SUBREAPER = 37


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process, so escapees stay findable."""
    try:
        return bool(_libc().prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


@functools.cache
def _libc() -> ctypes.CDLL:
    """One handle (each CDLL makes objects only the cycle collector frees; sweeps ask often)."""
    return ctypes.CDLL(None, use_errno=True)


def helper_command(name: str) -> list[str]:
    """The command that starts one of execd's helper processes (`watchdog`, `enter`) with what runs
    the daemon: in a bundle its own binary (a hidden command); else this Python, isolated from the
    caller's PYTHON* variables (a shell's environment may hold any), with the package on its path."""
    if getattr(sys, "frozen", False):
        return [sys.executable, f"_{name}"]
    import execd

    root = os.path.dirname(os.path.dirname(os.path.abspath(execd.__file__)))
    code = f"import sys;sys.path.insert(0,{root!r});from execd.{name} import main;main(sys.argv[1:])"
    return [sys.executable, "-E", "-S", "-c", code]  # no site: the helpers need only the standard library


def setns(fd: int) -> None:
    """Join the namespace `fd` names (os.setns arrives with Python 3.12)."""
    _check(_libc().setns(fd, 0))


_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_CAP_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32))


def drop_capabilities() -> None:
    """Empty the bounding, inheritable and ambient sets: nothing this process execs holds or gains a
    capability, root included (setuid binaries may still switch uid). Every number up to 63 is
    tried (EINVAL past what the kernel knows): a count read from /proc could be the sandbox's."""
    libc = _libc()
    for cap in range(64):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
            _raise_errno()
    _check(libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0))
    header, data = _CapHeader(_CAP_VERSION_3, 0), (_CapData * 2)()
    _check(libc.capget(ctypes.byref(header), data))
    data[0].inheritable = data[1].inheritable = 0
    _check(libc.capset(ctypes.byref(header), data))


def set_no_new_privs() -> None:
    """setuid bits and file capabilities mean nothing to what this process execs."""
    _check(_libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether `ancestor` is on `pid`'s parent chain. Race-free for a subreaper's descendants: an
    orphan re-parents to its nearest subreaper, so their chains only ever lead towards it."""
    seen = 0
    while pid > 1 and seen < 4096:
        pid = _parent_of(pid)
        if pid == ancestor:
            return True
        seen += 1
    return False


def _parent_of(pid: int) -> int:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else 0


def _check(result: int) -> None:
    if result != 0:
        _raise_errno()


def _raise_errno() -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))


def is_subreaper() -> bool:
    if os.getpid() == 1:
        return True
    try:
        flag = ctypes.c_int(0)
        return bool(_libc().prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0 and flag.value)
    except (OSError, AttributeError):
        return False


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_buffers_on_the_heap(mmap_threshold: int = 1 << 20, trim_threshold: int = 2 << 20) -> bool:
    """glibc serves an allocation above its mmap threshold (128 KiB until a block that large is
    freed) with mmap, and its release with munmap: asyncio's 256 KiB socket read buffer then costs
    three system calls a request, every request. Fixed thresholds keep such buffers on the heap.
    False where this is not glibc."""
    try:
        libc = _libc()
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):
        return False


@functools.cache
def raise_fd_limit() -> int:
    """Lift the soft limit on open files to the hard one (each session holds 6 fds).

    Returns the old soft limit, which the shells get back: some programs loop over every
    possible fd, and a huge limit makes them slow.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return soft


def boot_ticks_now() -> int:
    """The clock /proc/PID/stat start times are counted on (ticks since boot)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _CLOCK_TICKS)


class Moment:
    """A point in process-creation order: the boot clock in ticks and the last pid handed out.

    Ticks alone are too coarse (10 ms): a background job started just before a run would pass for
    one of the run's processes. Pids are handed out in increasing order, wrapping around at
    pid_max, so within a tick or two the last pid tells before from after (counted modulo the
    wrap: under load it comes about once a minute); over longer spans the ticks do.
    """

    __slots__ = ("last_pid", "ticks")  # a plain class: dataclasses costs the helpers' start 15 ms

    def __init__(self, ticks: int, last_pid: int) -> None:
        self.ticks, self.last_pid = ticks, last_pid


@functools.cache
def _last_pid_fd() -> int | None:
    try:
        return os.open("/proc/sys/kernel/ns_last_pid", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def now() -> Moment:
    fd = _last_pid_fd()
    last_pid = int(os.pread(fd, 16, 0)) if fd is not None else 0
    return Moment(boot_ticks_now(), last_pid)


def started_between(pid: int, after: Moment, before: Moment | None) -> bool:
    """Whether process `pid` was created after `after` and (if given) before `before`."""
    ticks = start_ticks(pid)
    if ticks is None or ticks < after.ticks or (before is not None and ticks > before.ticks):
        return False
    if ticks <= after.ticks + 1 and after.last_pid and not pid_after(pid, after.last_pid):
        return False
    return not (
        before is not None and ticks >= before.ticks - 1 and before.last_pid and pid_after(pid, before.last_pid)
    )


def pid_after(pid: int, last_pid: int) -> bool:
    """Whether `pid` was handed out after `last_pid`, across a wrap-around: fewer than half of
    pid_max pids are handed out within the tick or two this is asked about."""
    span = _pid_max()
    return 0 < (pid - last_pid) % span < span // 2


@functools.cache
def _pid_max() -> int:
    try:
        with open("/proc/sys/kernel/pid_max", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 22


def start_ticks(pid: int) -> int | None:
    """Start time of `pid` in ticks since boot, exact (psutil's create_time can be ~1 s off)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/PID/stat from its third field (the state) on; None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    return stat[stat.rfind(b")") + 2 :].split()


def ppid_map() -> dict[int, int]:
    """pid -> parent pid for every process, from one pass over /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        parents[int(entry)] = int(stat[stat.rfind(b")") + 2 :].split(maxsplit=2)[1])
    return parents


@functools.cache
def _has_children_files() -> bool:
    return os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def _children_from_files(pid: int) -> list[int]:
    """A process's children, from /proc/PID/task/*/children (each thread lists its own)."""
    found: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found.extend(int(child) for child in f.read().split())
        except OSError:
            continue
    return found


class Tree:
    """Who is whose child, right now. Reads only the part of /proc it is asked about when the
    kernel has children files (a few reads per session, whatever else runs on the machine);
    otherwise one pass over all of /proc."""

    def __init__(self) -> None:
        if _has_children_files():
            self.children = _children_from_files
        else:
            by_parent: dict[int, list[int]] = {}
            for child, parent in ppid_map().items():
                by_parent.setdefault(parent, []).append(child)
            self.children = lambda pid: by_parent.get(pid, [])

    def subtree(self, pid: int) -> list[int]:
        """Every live descendant of `pid`."""
        found: list[int] = []
        stack = list(self.children(pid))
        while stack:
            child = stack.pop()
            found.append(child)
            stack.extend(self.children(child))
        return found


def tag_of(pid: int) -> str | None:
    """The session tag in a process's environment, if any."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except OSError:
        return None
    key = SESSION_TAG.encode() + b"="
    for entry in environ.split(b"\0"):
        if entry.startswith(key):
            return entry[len(key) :].decode(errors="replace")
    return None


def command_line(pid: int) -> str:
    """A process's arguments joined by spaces ("" for a kernel thread, a zombie, or one gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return ""
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")


def all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


# Children this process spawned and reaps itself (session shells, the watchdog). Process-wide on
# purpose: it describes this process's children, whichever daemon in it spawned them. The orphan
# reaper leaves them alone, and a sweep for escapees does not mistake them for one.
owned_children: set[int] = set()


def session_processes(sessions: Mapping[str, int | None]) -> set[int]:
    """Every process of these sessions (session tag -> its shell's pid, None once the shell is
    reaped: its pid may belong to someone else by then): the shells, their descendants, and every
    process that left a shell's tree but carries one of the tags.

    As a child subreaper the daemon adopts escapees (setsid, double fork), so they are found among
    its own children; without that the whole machine is scanned for the tags.
    """
    tree = Tree()
    found: set[int] = set()
    for shell in sessions.values():
        if shell is not None:
            found.add(shell)
            found.update(tree.subtree(shell))
    for escapee in escapees(set(sessions), found, tree):
        found.add(escapee)
        found.update(tree.subtree(escapee))
    return found


def escapees(tags: set[str], known: set[int], tree: Tree) -> list[int]:
    """Processes outside `known` that carry one of `tags` and have left their shell's tree: as a
    subreaper we adopt them, so they are among our children; otherwise anywhere on the machine."""
    candidates = tree.children(os.getpid()) if is_subreaper() else all_pids()
    return [pid for pid in candidates if pid not in known and pid not in owned_children and tag_of(pid) in tags]


def processes_started_between(
    shell: int, tag: str, after: Moment, before: Moment | None, *, same_group_only: bool = False
) -> list[int]:
    """The processes a run started (between `after` and `before`), escapees included. Older
    background jobs are left alone, and so is everything they start: a process belongs to the run
    when the shell's child (or the adopted escapee) at the top of its branch was started during it.
    `same_group_only`: only those still in the shell's process group (what Ctrl-C reaches)."""
    tree = Tree()
    tops = [pid for pid in tree.children(shell) if started_between(pid, after, before)]
    tops += [pid for pid in escapees({tag}, {shell}, tree) if started_between(pid, after, before)]
    pids = []
    for pid in {member for top in tops for member in (top, *tree.subtree(top))}:
        if same_group_only and _group_of(pid) != shell:
            continue
        pids.append(pid)
    return pids


def kill_sessions(
    sessions: Mapping[str, int | None], timeout_s: float = 5.0, cgroups: SessionCgroups | None = None
) -> bool:
    """SIGKILL these sessions' cgroups (where they have one), process groups, their descendants
    that left them, and every tagged escapee; wait until all have exited and reap those that are
    our children (shells excepted: their owners reap them). One pass over /proc serves every
    session, so a shutdown of a thousand sessions costs a few scans, not a thousand. Blocking: call
    it from a thread. False if some process survived `timeout_s`.
    """
    contained = cgroups.kill(list(sessions)) if cgroups is not None else []
    shells = {pid for pid in sessions.values() if pid is not None}
    for shell in sessions.values():
        if shell is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(shell, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    # Something may fork between a listing and the kill: sweep again once the victims are gone,
    # until a sweep finds nothing. A sweep that killed escapees is checked once more a moment
    # later (a process in the middle of exec may not show its environment for an instant).
    recheck = False
    while True:
        victims = [pid for pid in session_processes(sessions) if _alive(pid)]
        if not victims:
            if not recheck:
                break
            recheck = False
            time.sleep(0.002)
            continue
        # (The shells are no escapees: one may be reaped by its owner meanwhile, and have no group.)
        recheck = recheck or any(pid not in shells and _group_of(pid) not in shells for pid in victims)
        signal_pids(victims, signal.SIGKILL)
        if not wait_exits(victims, deadline):
            return False
    if cgroups is not None and contained:
        if not cgroups.wait_empty(contained, deadline):
            return False
        cgroups.retire(contained)
    reap_zombie_children()
    return True


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def wait_exits(pids: Iterable[int], deadline: float) -> bool:
    """Wait until every one of `pids` has exited (a zombie counts), on pidfds; False at `deadline`."""
    poller = select.poll()
    fds = []
    try:
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except (ProcessLookupError, OSError):
                continue  # already gone (and reaped)
            fds.append(fd)
            poller.register(fd, select.POLLIN)
        pending = len(fds)
        while pending:
            left_ms = (deadline - time.monotonic()) * 1000
            if left_ms <= 0:
                return False
            for fd, _ in poller.poll(left_ms):
                poller.unregister(fd)
                pending -= 1
        return True
    finally:
        for fd in fds:
            os.close(fd)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z"


def reap_zombie_children() -> list[int]:
    """Reap exited children that are not ours to reap (orphans re-parented to us as subreaper or
    PID 1). Only zombies are waited for, by pid, so no owner loses an exit status to us."""
    reaped: list[int] = []
    for pid in Tree().children(os.getpid()):
        if pid in owned_children or _alive(pid):
            continue
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                reaped.append(pid)
        except ChildProcessError:
            continue
    return reaped


class Usage:
    __slots__ = ("cpu_seconds", "num_processes", "rss_bytes")

    def __init__(self, num_processes: int, rss_bytes: int, cpu_seconds: float) -> None:
        self.num_processes, self.rss_bytes, self.cpu_seconds = num_processes, rss_bytes, cpu_seconds


def usage(shell_pid: int | None, tag: str) -> Usage:
    """Resources summed over a shell's tree plus every escapee that carries its tag."""
    import psutil  # not at the top: the watchdog uses this module and must start fast

    pids = session_processes({tag: shell_pid})
    count, rss, cpu = 0, 0, 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                mem = proc.memory_info().rss
                times = proc.cpu_times()
        except psutil.Error:
            continue
        count += 1
        rss += mem
        cpu += times.user + times.system
    return Usage(num_processes=count, rss_bytes=rss, cpu_seconds=round(cpu, 3))
