"""Who a shell runs as: a user, its groups, and what that user may open.

The daemon keeps its own user (root in the image); a shell may run as another one (`--run-as`, a
session's `user`). Switching is done by util-linux's `setpriv` at spawn, so the daemon's spawn stays
a `posix_spawn` (no fork of a threaded Python) and the switch happens before bash runs a line; where
`setpriv` is missing (a bundle in a bare image), or the shell starts in another container (sidecar
mode), by execd's own spawner (execd/enter.py), at the price of a Python start per shell.

In sidecar mode users, groups and paths are the target container's: they are looked up under its
root (`/proc/PID/root`), in its /etc/passwd and /etc/group, and its symbolic links are followed
inside it.
"""

from __future__ import annotations

import functools
import grp
import os
import pwd
import shutil
import stat
from dataclasses import dataclass

SETPRIV = shutil.which("setpriv")
MAX_SYMLINKS = 40  # as the kernel's path walk
MAX_ACCOUNTS_BYTES = 1 << 20  # a target's /etc/passwd or /etc/group larger than this is refused
_NO_ID = 2**32 - 1  # (uid_t)-1 means "no change" to the kernel


class UnknownIdentity(ValueError):
    """A user or group that names nobody, or one the daemon may not switch to."""


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups
    name: str  # the login name, or the uid as text when the user has no passwd entry
    home: str

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def environment(self) -> dict[str, str]:
        """What a login would set for this user."""
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}

    def may_enter(self, path: str, root: str = "/") -> bool:
        """Whether this user can `cd` into `path` (under `root`): every directory on the way is
        searchable by it (mode bits; ACLs are not read). Symbolic links are followed first, as
        `cd` would."""
        real = real_path(path, root)
        along = None if real is None else stats_along(real, root)
        if along is None or not stat.S_ISDIR(along[-1].st_mode):
            return False
        return self.is_root or all(self._may_search(info) for info in along)

    def _may_search(self, info: os.stat_result) -> bool:
        if info.st_uid == self.uid:
            return bool(info.st_mode & stat.S_IXUSR)
        if info.st_gid == self.gid or info.st_gid in self.groups:
            return bool(info.st_mode & stat.S_IXGRP)
        return bool(info.st_mode & stat.S_IXOTH)

    def spawn_prefix(self, allow_privilege_escalation: bool) -> list[str]:
        """The command that puts a shell in this identity before it execs bash. Unless allowed,
        the shell and all it starts get `no_new_privs` and an empty capability bounding set: a
        setuid binary in the image cannot make it root again."""
        if SETPRIV is None:
            from execd import process  # not at the top: the client commands import this module

            return [*process.helper_command("enter"), *self.enter_options(allow_privilege_escalation), "--"]
        groups = ",".join(str(g) for g in self.groups)
        prefix = [SETPRIV, f"--reuid={self.uid}", f"--regid={self.gid}"]
        prefix.append(f"--groups={groups}" if groups else "--clear-groups")
        if not allow_privilege_escalation:
            prefix += ["--no-new-privs", "--bounding-set=-all", "--inh-caps=-all"]
        return [*prefix, "--"]

    def enter_options(self, allow_privilege_escalation: bool) -> list[str]:
        """The same, as options of execd's spawner (execd/enter.py)."""
        groups = ",".join(str(g) for g in self.groups)
        options = ["--user", f"{self.uid}:{self.gid}:{groups}"]
        return options if allow_privilege_escalation else [*options, "--no-new-privs"]


def under(root: str, path: str) -> str:
    """`path` of a root as the daemon reaches it."""
    return path if root == "/" else root + path


def real_path(path: str, root: str = "/") -> str | None:
    """`path` with every symbolic link followed, as a process whose root is `root` would follow
    them (an absolute link starts again at `root`, `..` stops there); None past MAX_SYMLINKS."""
    if root == "/":
        return os.path.realpath(path)
    parts = [p for p in path.split("/") if p]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        here = "/" + "/".join([*resolved, part])
        try:
            link = os.readlink(under(root, here))
        except OSError:  # not a link, or not there: the caller's stat tells
            resolved.append(part)
            continue
        hops += 1
        if hops > MAX_SYMLINKS:
            return None
        if link.startswith("/"):
            resolved = []
        parts = [p for p in link.split("/") if p] + parts
    return "/" + "/".join(resolved)


def is_directory(path: str, root: str = "/") -> bool:
    """Whether `path` (already resolved by real_path) is a directory under `root`."""
    along = stats_along(path, root)
    return along is not None and stat.S_ISDIR(along[-1].st_mode)


def stats_along(path: str, root: str = "/") -> list[os.stat_result] | None:
    """The status of the root and of every component of `path` (already resolved by real_path),
    each opened from its parent's fd without following links: one swapped in since the resolution
    ends the walk (None), so nothing outside the root is ever looked at."""
    with _Walk(path, root) as walk:
        return walk.stats


class _Walk:
    """Open the components of a resolved path one by one, `O_NOFOLLOW`, from the root's fd."""

    def __init__(self, path: str, root: str) -> None:
        self.parts = [p for p in path.split("/") if p]
        self.root = root
        self.fds: list[int] = []
        self.stats: list[os.stat_result] | None = None

    def __enter__(self) -> _Walk:
        flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self.fds.append(os.open(under(self.root, "/"), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
            stats = [os.fstat(self.fds[-1])]
            for part in self.parts:
                self.fds.append(os.open(part, flags, dir_fd=self.fds[-1]))
                stats.append(os.fstat(self.fds[-1]))
                if stat.S_ISLNK(stats[-1].st_mode):
                    return self
            self.stats = stats
        except OSError:
            pass
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds:
            os.close(fd)

    @property
    def parent_fd(self) -> int | None:
        """The fd of the last component's directory, once every component was there."""
        return self.fds[-2] if self.stats is not None and len(self.fds) >= 2 else None


@functools.cache
def daemon_identity() -> Identity:
    uid = os.geteuid()
    try:
        entry = pwd.getpwuid(uid)
        name, home = entry.pw_name, entry.pw_dir
    except KeyError:
        name, home = str(uid), "/"
    return Identity(uid, os.getegid(), tuple(os.getgroups()), name, home)


def default_cwd(user: Identity | None) -> str:
    """Where a session starts when it names no cwd: the daemon's own working directory, unless the
    shell's user may not enter it; then that user's home, else `/`."""
    here = os.getcwd()
    if user is None or user.may_enter(here):
        return here
    return user.home if user.may_enter(user.home) else "/"


def can_switch() -> bool:
    """Only root may run shells as other users."""
    return os.geteuid() == 0


def resolve(spec: str, root: str = "/") -> Identity:
    """`USER[:GROUP]`, each a name or a number, looked up in the accounts of `root`. A number with
    no passwd entry is taken as it is (as container runtimes do), with a group of the same number,
    home `/`."""
    user, _, group = spec.partition(":")
    if not user:
        raise UnknownIdentity(f"{spec!r} names no user")
    accounts = Accounts(root)
    entry = accounts.user(user)
    if entry is not None:
        uid, gid, name, home = entry
    elif user.isdigit() and int(user) < _NO_ID:
        uid = gid = int(user)
        name, home = user, "/"
    else:
        raise UnknownIdentity(f"no user named {user!r}")
    if group:
        gid = accounts.group_id(group)
    groups = accounts.groups_of(name, gid) if entry is not None and not group else ()
    identity = Identity(uid, gid, groups, name, home)
    if (identity.uid != os.geteuid() or identity.gid != os.getegid()) and not can_switch():
        raise UnknownIdentity(f"the daemon does not run as root: it cannot run shells as {spec!r}")
    return identity


class Accounts:
    """Users and groups: this system's (the C library's, NSS included), or the files of another
    root's /etc."""

    def __init__(self, root: str = "/") -> None:
        self.root = root

    def user(self, user: str) -> tuple[int, int, str, str] | None:
        """uid, gid, name and home of a name or a uid."""
        if self.root == "/":
            try:
                e = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
            except (KeyError, OverflowError):
                return None
            return e.pw_uid, e.pw_gid, e.pw_name, e.pw_dir
        column = 2 if user.isdigit() else 0  # a number is a uid, never a name (as above)
        for f in self._entries("passwd"):
            if len(f) >= 6 and f[2].isdigit() and f[3].isdigit() and f[column] == user:
                return int(f[2]), int(f[3]), f[0], f[5] or "/"
        return None

    def group_id(self, group: str) -> int:
        if self.root == "/":
            try:
                return grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
            except (KeyError, OverflowError):
                pass
        else:
            column = 2 if group.isdigit() else 0
            for f in self._entries("group"):
                if len(f) >= 3 and f[2].isdigit() and f[column] == group:
                    return int(f[2])
        if group.isdigit() and int(group) < _NO_ID:
            return int(group)
        raise UnknownIdentity(f"no group named {group!r}")

    def groups_of(self, name: str, gid: int) -> tuple[int, ...]:
        """The primary group and every group that lists `name` as a member."""
        if self.root == "/":
            try:
                return tuple(sorted(set(os.getgrouplist(name, gid))))
            except OSError:
                return (gid,)
        entries = self._entries("group")
        member = {int(f[2]) for f in entries if len(f) >= 4 and f[2].isdigit() and name in f[3].split(",")}
        return tuple(sorted(member | {gid}))

    def _entries(self, table: str) -> list[list[str]]:
        """The lines of the root's /etc/TABLE: its links followed inside the root (never out of
        it), a regular file of at most MAX_ACCOUNTS_BYTES (a FIFO or a device would hang or flood
        the daemon)."""
        path = real_path(f"/etc/{table}", self.root)
        if path is None:
            return []
        with _Walk(path, self.root) as walk:
            if walk.parent_fd is None or walk.stats is None or not stat.S_ISREG(walk.stats[-1].st_mode):
                return []
            try:
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                fd = os.open(os.path.basename(path), flags, dir_fd=walk.parent_fd)
            except OSError:
                return []
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return []
            text = f.read(MAX_ACCOUNTS_BYTES + 1)
        if len(text) > MAX_ACCOUNTS_BYTES:
            return []
        lines = text.decode("utf-8", errors="replace").splitlines()
        return [line.split(":") for line in lines if line.strip() and not line.startswith("#")]


class Owner:
    """The user a switched shell runs as owns the files of its private dir (0600); the dir itself
    stays the daemon's (0711), so that user can neither list it nor swap a file for a link."""

    __slots__ = ("gid", "uid")

    def __init__(self, uid: int, gid: int) -> None:
        self.uid, self.gid = uid, gid

    @classmethod
    def of(cls, user: Identity | None) -> Owner | None:
        """An owner when the shell runs as someone other than the daemon; None otherwise."""
        if user is None or (user.uid == os.geteuid() and user.gid == os.getegid()):
            return None
        return cls(user.uid, user.gid)

    def give(self, fd_or_path: int | str) -> None:
        os.chown(fd_or_path, self.uid, self.gid)
