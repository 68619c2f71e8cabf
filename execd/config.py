"""Settings: defaults, overridden by EXECD_* environment variables, overridden by flags."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from execd import identity
from execd.target import Selector


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 44772
    access_token: str | None = field(default=None, repr=False)
    access_token_file: str | None = None  # read at start; keeps the token out of `ps` and environ
    max_sessions: int = 256
    max_body_bytes: int = 1024 * 1024
    max_output_bytes: int = 256 * 1024 * 1024
    idle_timeout_s: float = 0.0
    max_run_timeout_ms: int = 86_400_000
    interrupt_grace_ms: int = 2000
    kill_wait_ms: int = 1000  # SIGKILL -> exits; past it the shell of a stuck run is given up
    sse_ping_s: float = 15.0
    between_runs_bytes: int = 1024 * 1024
    run_log_bytes: int = 1024 * 1024
    runs_kept: int = 16
    disconnect_grace_ms: int = 0
    max_readers: int = 8
    shutdown_grace_s: float = 5.0
    log_format: str = "auto"  # auto: console in a terminal, JSON otherwise
    log_level: str = "info"
    reap_orphans: bool = True  # be a child subreaper and reap what re-parents to us
    event_loop: str = "asyncio"  # or uvloop (the `fast` extra): see docs/performance.md
    run_as: str | None = None  # USER[:GROUP] every shell runs as; the daemon keeps its own user
    max_processes: int = 0  # RLIMIT_NPROC of a shell's user when it is not root; 0 = unchanged
    allow_privilege_escalation: bool = False  # keep setuid binaries working in switched shells
    session_cgroups: bool = True  # a cgroup per session where cgroup v2 is writable (else tag sweeps)
    max_connections: int = 1024  # open HTTP connections; past it new ones wait in the backlog
    request_timeout_s: float = 30.0  # a request's headers and body must arrive within it
    keepalive_timeout_s: float = 75.0  # an idle keep-alive connection is closed after it
    metrics_port: int = 0  # also serve /metrics with no token on this port of the same host; 0 = off
    opensandbox_at_root: bool = False  # the OpenSandbox adapter also at / (then /session* speak its dialect)
    target: str | None = None  # sidecar mode: pid:N, pidfile:PATH or cmdline:REGEX; shells start in its container
    state_dir: str | None = None  # where the sessions' private files go (default: the temp dir)

    def __post_init__(self) -> None:
        """Every value in its range: a bad flag or variable stops the daemon at start, by name."""
        for name, (low, high) in _RANGES.items():
            value = getattr(self, name)
            if not math.isfinite(value) or value < low or (high is not None and value > high):
                bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
                raise ValueError(f"{_flag(name)}: must be {bounds}, got {value!r}")
        if self.target is not None:
            try:
                Selector.parse(self.target)
            except ValueError as exc:
                raise ValueError(f"{_flag('target')}: {exc}") from None
        if self.run_as is not None:
            try:
                # In sidecar mode names are the target's, looked up at each session's start.
                identity.resolve(self.run_as if self.target is None else "0")
            except identity.UnknownIdentity as exc:
                raise ValueError(f"{_flag('run_as')}: {exc}") from None
        if self.state_dir is not None and not os.path.isdir(self.state_dir):
            raise ValueError(f"{_flag('state_dir')}: {self.state_dir!r} is not a directory")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"{_flag(name)}: must be one of {', '.join(sorted(choices))}, got {getattr(self, name)!r}"
                )

    @staticmethod
    def env_name(name: str) -> str:
        return "EXECD_" + name.upper()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(cls.env_name(f.name))
            if raw is not None and raw != "":
                values[f.name] = _parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


_RANGES: dict[str, tuple[float, float | None]] = {
    "port": (0, 65535),
    "max_sessions": (1, None),
    "max_body_bytes": (1, None),
    "max_output_bytes": (0, None),
    "idle_timeout_s": (0, None),
    "max_run_timeout_ms": (0, None),
    "interrupt_grace_ms": (0, None),
    "kill_wait_ms": (0, None),
    "sse_ping_s": (0, None),
    "between_runs_bytes": (0, None),
    "run_log_bytes": (1, None),
    "runs_kept": (0, None),
    "disconnect_grace_ms": (0, None),
    "max_readers": (1, None),
    "shutdown_grace_s": (0, None),
    "max_processes": (0, None),
    "max_connections": (1, None),
    "request_timeout_s": (0.001, None),
    "keepalive_timeout_s": (0, None),
    "metrics_port": (0, 65535),
}
_CHOICES = {
    "log_format": frozenset({"auto", "json", "console"}),
    "log_level": frozenset({"debug", "info", "warning", "error", "critical"}),
    "event_loop": frozenset({"asyncio", "uvloop"}),
}


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')} ({Settings.env_name(name)})"


def _field_type(f: dataclasses.Field[object]) -> type:
    text = str(f.type)
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if text.startswith(name):
            return kind
    return str


def _parse(f: dataclasses.Field[object], raw: str) -> object:
    kind = _field_type(f)
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{Settings.env_name(f.name)}: expected a boolean, got {raw!r}")
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{Settings.env_name(f.name)}: expected {kind.__name__}, got {raw!r}") from None


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting: --max-sessions N is EXECD_MAX_SESSIONS."""
    for f in dataclasses.fields(Settings):
        kind = _field_type(f)
        flag = "--" + f.name.replace("_", "-")
        helptext = f"(env {Settings.env_name(f.name)}, default {f.default!r})"
        if f.name == "access_token":
            helptext = f"(env {Settings.env_name(f.name)}; none = no authentication; visible in `ps`: prefer the file)"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=helptext)


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    names: Sequence[str] = [f.name for f in dataclasses.fields(Settings)]
    settings = Settings.from_env(environ, **{n: getattr(args, n, None) for n in names})
    if settings.access_token_file is None:
        return settings
    if settings.access_token is not None:
        raise ValueError(f"{_flag('access_token')} and {_flag('access_token_file')}: give one, not both")
    try:
        with open(settings.access_token_file, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{_flag('access_token_file')}: cannot read {settings.access_token_file!r}: {exc}") from None
    if not token:
        raise ValueError(f"{_flag('access_token_file')}: {settings.access_token_file!r} is empty")
    return dataclasses.replace(settings, access_token=token)
