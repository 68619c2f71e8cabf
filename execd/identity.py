"""Who a shell runs as: a user, its groups, and what that user may open.

The daemon keeps its own user (root in the image); a shell may run as another one (`--run-as`, a
session's `user`). Switching is done by util-linux's `setpriv` at spawn, so the daemon's spawn stays
a `posix_spawn` (no fork of a threaded Python) and the switch happens before bash runs a line.
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

    def may_enter(self, path: str) -> bool:
        """Whether this user can `cd` into `path`: every directory on the way is searchable by it
        (mode bits; ACLs are not read). Symbolic links are followed first, as `cd` would."""
        real = os.path.realpath(path)
        try:
            if not stat.S_ISDIR(os.stat(real).st_mode):
                return False
        except OSError:
            return False
        if self.is_root:
            return True
        current = "/"
        for part in [""] + [p for p in real.split("/") if p]:
            current = os.path.join(current, part)
            if not self._may_search(current):
                return False
        return True

    def _may_search(self, directory: str) -> bool:
        try:
            info = os.stat(directory)
        except OSError:
            return False
        if info.st_uid == self.uid:
            return bool(info.st_mode & stat.S_IXUSR)
        if info.st_gid == self.gid or info.st_gid in self.groups:
            return bool(info.st_mode & stat.S_IXGRP)
        return bool(info.st_mode & stat.S_IXOTH)

    def spawn_prefix(self, allow_privilege_escalation: bool) -> list[str]:
        """The command that puts a shell in this identity before it execs bash. Unless allowed,
        the shell and all it starts get `no_new_privs` and an empty capability bounding set: a
        setuid binary in the image cannot make it root again."""
        assert SETPRIV is not None
        groups = ",".join(str(g) for g in self.groups)
        prefix = [SETPRIV, f"--reuid={self.uid}", f"--regid={self.gid}"]
        prefix.append(f"--groups={groups}" if groups else "--clear-groups")
        if not allow_privilege_escalation:
            prefix += ["--no-new-privs", "--bounding-set=-all", "--inh-caps=-all"]
        return [*prefix, "--"]


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
    return os.geteuid() == 0 and SETPRIV is not None


def resolve(spec: str) -> Identity:
    """`USER[:GROUP]`, each a name or a number. A number with no passwd entry is taken as it is
    (as container runtimes do), with a group of the same number, home `/`."""
    user, _, group = spec.partition(":")
    if not user:
        raise UnknownIdentity(f"{spec!r} names no user")
    entry = _passwd(user)
    if entry is not None:
        uid, gid, name, home = entry.pw_uid, entry.pw_gid, entry.pw_name, entry.pw_dir
    elif user.isdigit() and int(user) < _NO_ID:
        uid = gid = int(user)
        name, home = user, "/"
    else:
        raise UnknownIdentity(f"no user named {user!r}")
    if group:
        gid = _group_id(group)
    groups = _supplementary_groups(name, gid) if entry is not None and not group else ()
    identity = Identity(uid, gid, groups, name, home)
    if identity.uid != os.geteuid() or identity.gid != os.getegid():
        if os.geteuid() != 0:
            raise UnknownIdentity(f"the daemon does not run as root: it cannot run shells as {spec!r}")
        if SETPRIV is None:
            raise UnknownIdentity("switching users needs util-linux's setpriv, which is not installed")
    return identity


def _passwd(user: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        return None


def _group_id(group: str) -> int:
    try:
        return grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
    except (KeyError, OverflowError):
        if group.isdigit() and int(group) < _NO_ID:
            return int(group)
        raise UnknownIdentity(f"no group named {group!r}") from None


def _supplementary_groups(name: str, gid: int) -> tuple[int, ...]:
    try:
        return tuple(sorted(set(os.getgrouplist(name, gid))))
    except OSError:
        return (gid,)


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
