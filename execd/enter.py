"""The spawner: what runs between the daemon's posix_spawn and bash when a shell must start where
the daemon is not, in another container's namespaces and root (sidecar mode, `--target`), or as
another user where util-linux's `setpriv` is missing (a bundle in a bare image).

A fresh, single-threaded process (setns(2) into a mount namespace is refused to a threaded one):

    _enter [--env-fd N] [--target PID:START_TICKS] [--user UID:GID:G1,G2] [--no-new-privs] -- PROGRAM ARGS...

In order: join the target's IPC, UTS and mount namespaces, take its root (and, when the shell's
`__EXECD_CWD` is empty, its cwd: the path as the target sees it); set groups and gid; empty the
capability sets (always in a target's container) and set `no_new_privs` (unless escalation is
allowed); set uid; exec PROGRAM, looked up on the PATH of the environment it was given (the
target's, in sidecar mode). Any failure is one line on stderr and exit status 126.

In sidecar mode that environment (the target's, which the sandbox controls) must not be this
process's own: it runs as root with the daemon's capabilities, and `LD_PRELOAD` and its like would
act on it. So it starts with a bare environment and reads the program's from `--env-fd` (a memfd the
daemon filled), applied only at the exec.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from execd import frozen, process

NAMESPACES = ("ipc", "uts", "mnt")  # mnt last: after it, the target's /proc paths are out of reach
FAILED = 126


class EnterFailed(Exception):
    pass


class Plan:
    """What to do before the exec (a plain class: importing dataclasses costs a start 15 ms)."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.target: tuple[int, int] | None = None  # pid, start ticks (a pid reused meanwhile is refused)
        self.user: tuple[int, int, list[int]] | None = None
        self.no_new_privs = False
        self.env_fd: int | None = None


def parse(args: Sequence[str]) -> Plan:
    args = list(args)
    if "--" not in args:
        raise EnterFailed("usage: _enter [--env-fd N] [--target PID:START] [--user U:G:GS] [--no-new-privs] -- ARGV")
    split = args.index("--")
    options, argv = args[:split], args[split + 1 :]
    if not argv:
        raise EnterFailed("no program to run")
    plan = Plan(argv)
    while options:
        option = options.pop(0)
        if option == "--no-new-privs":
            plan.no_new_privs = True
        elif option == "--env-fd" and options:
            plan.env_fd = int(options.pop(0))
        elif option == "--target" and options:
            pid, _, start = options.pop(0).partition(":")
            plan.target = (int(pid), int(start))
        elif option == "--user" and options:
            uid, gid, groups = options.pop(0).split(":")
            plan.user = (int(uid), int(gid), [int(g) for g in groups.split(",") if g])
        else:
            raise EnterFailed(f"unknown option {option!r}")
    return plan


def enter_target(pid: int, start: int, env: dict[str, str]) -> None:
    """Everything is opened before the first setns: after it, /proc/PID is looked up elsewhere."""
    fds = {name: os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC) for name in NAMESPACES}
    root = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    cwd = os.open(f"/proc/{pid}/cwd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if process.start_ticks(pid) != start:
        raise EnterFailed(f"the target process {pid} has ended")
    for name in NAMESPACES:
        process.setns(fds[name])
    os.fchdir(root)
    os.chroot(".")
    os.chdir("/")
    if not env.get("__EXECD_CWD"):
        os.fchdir(cwd)
        try:
            here = os.getcwd()
        except OSError:  # removed, or outside the target's root (it chrooted after its cd)
            here = "/"
        env["__EXECD_CWD"] = here if here.startswith("/") else "/"


def become(uid: int, gid: int, groups: list[int], drop_capabilities: bool, no_new_privs: bool) -> None:
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    if drop_capabilities:
        process.drop_capabilities()  # the bounding set needs CAP_SETPCAP: before setuid
    if no_new_privs:
        process.set_no_new_privs()
    os.setresuid(uid, uid, uid)


def find_program(name: str, path: str) -> str:
    """`name` on `path`, as execvp would find it. Not os.execvpe: after the chroot no module can be
    imported any more, and it imports one on its way."""
    if "/" in name:
        return name
    for directory in path.split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    raise EnterFailed(f"{name}: not found on PATH {path!r}")


def first_enterable(*paths: str) -> str:
    """The target's cwd may be closed to the shell's user: then its home, else `/`."""
    for path in paths:
        try:
            os.chdir(path)
            return path
        except OSError:
            continue
    return "/"


def read_environment(fd: int) -> dict[str, str]:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    env = {}
    for item in b"".join(chunks).split(b"\0"):
        name, sep, value = item.partition(b"=")
        if sep and name:
            env[os.fsdecode(name)] = os.fsdecode(value)
    return env


def main(args: Sequence[str]) -> None:
    try:
        plan = parse(args)
        # Without --env-fd: the environment it was given, but a bundle's library path is not for the shell.
        env = read_environment(plan.env_fd) if plan.env_fd is not None else frozen.original_environ()
        defaulted = not env.get("__EXECD_CWD")
        if plan.target is not None:
            enter_target(*plan.target, env)
            wrapper = env.get("BASH_ENV", "")
            if wrapper and not os.path.exists(wrapper):  # bash would start without it, and hang
                raise EnterFailed(f"{wrapper} is not in the target's root: mount --state-dir at the same path there")
        # In the target's container the daemon's capabilities never reach a shell, root or not (the
        # sandbox's files name its users); elsewhere as setpriv would, with no_new_privs.
        drop = plan.no_new_privs or plan.target is not None
        if plan.user is not None:
            become(*plan.user, drop, plan.no_new_privs)
            if defaulted and plan.target is not None:
                env["__EXECD_CWD"] = first_enterable(env["__EXECD_CWD"], env.get("HOME", "/"), "/")
        elif drop:
            process.drop_capabilities()
            if plan.no_new_privs:
                process.set_no_new_privs()
        os.execve(find_program(plan.argv[0], env.get("PATH", os.defpath)), plan.argv, env)
    except (EnterFailed, OSError, ValueError) as exc:
        print(f"execd: the shell could not start: {exc}", file=sys.stderr)
        sys.exit(FAILED)
