"""The environment a bundle (scripts/bundle: a PyInstaller one-dir build) was started with.

PyInstaller's bootloader (6.22, Linux, one-dir) changes its own environment before Python starts,
then execs itself again (same pid) so that the dynamic loader sees the change:

- `LD_LIBRARY_PATH` becomes `DIR:ORIGINAL`, or just `DIR` when it was unset or empty, where DIR is
  the bundle's library directory (`sys._MEIPASS`, `<bundle>/_internal`);
- `LD_LIBRARY_PATH_ORIG` is set to the original value, only when there was a non-empty one;
- `_PYI_ARCHIVE_FILE`, `_PYI_PARENT_PROCESS_LEVEL`, `_PYI_LINUX_PROCESS_NAME` are set (and
  `_PYI_APPLICATION_HOME_DIR`, `_PYI_SPLASH_IPC` in other modes): its bookkeeping, with which
  another start of the same binary takes itself for a subprocess of this one and skips its set-up;
- `PYINSTALLER_RESET_ENVIRONMENT` is removed (nothing to restore: it only asks for a fresh start).

None of that may reach a shell: bash, and every program of the sandbox it starts, would load the
bundle's libraries (its libssl, libz, libffi …) before the image's own. `original_environ` undoes
exactly these changes; outside a bundle it is `os.environ` as it is.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

LIBRARY_PATH = "LD_LIBRARY_PATH"
SAVED_LIBRARY_PATH = "LD_LIBRARY_PATH_ORIG"
BOOKKEEPING_PREFIX = "_PYI_"
LEGACY_BOOKKEEPING = ("_MEIPASS2",)  # the same, by PyInstaller before 6.10


def is_frozen() -> bool:
    """Whether this process is a bundle's binary (not a Python interpreter)."""
    return bool(getattr(sys, "frozen", False))


def bundle_library_dir() -> str | None:
    """The directory the bootloader put first on the library path (None outside a bundle)."""
    if not is_frozen():
        return None
    return str(getattr(sys, "_MEIPASS", None) or os.path.join(os.path.dirname(sys.executable), "_internal"))


def original_environ(environ: Mapping[str, str] | None = None, library_dir: str | None = None) -> dict[str, str]:
    """A copy of `environ` (default: os.environ) as it was before the bootloader changed it.

    `library_dir` is the bundle's library directory (default: this process's, when it is a
    bundle; outside one, and given none, the copy is returned unchanged)."""
    env = dict(os.environ if environ is None else environ)
    library_dir = library_dir or bundle_library_dir()
    if library_dir is None:
        return env
    for name in [n for n in env if n.startswith(BOOKKEEPING_PREFIX) or n in LEGACY_BOOKKEEPING]:
        del env[name]
    value = env.get(LIBRARY_PATH)
    if value is None:
        return env
    first, colon, rest = value.partition(":")
    if not _same_directory(first, library_dir):
        return env  # not the bootloader's doing (set again by someone since): left alone
    if not colon:
        del env[LIBRARY_PATH]  # there was none (or an empty one: the same to the loader)
        return env
    env[LIBRARY_PATH] = rest
    if env.get(SAVED_LIBRARY_PATH) == rest:
        del env[SAVED_LIBRARY_PATH]  # the bootloader's copy (one the user had was overwritten by it)
    return env


def _same_directory(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
