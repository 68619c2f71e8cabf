"""A small root filesystem for the pod tests: bash, coreutils and what they link, and no Python;
built by copying this machine's binaries with the libraries `ldd` names, in a second or so."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

TOOLS = (
    "bash", "sh", "cat", "ls", "env", "sleep", "id", "echo", "pwd", "mkdir", "rm", "head", "tr",
    "stat", "kill", "setsid", "true", "false", "wc", "grep", "readlink", "touch", "sync",
)  # fmt: skip
MARKER = "execd-test-rootfs"  # in its /etc/os-release: shells that read it are in this root
SANDBOX_UID = 1000
_LIBRARY = re.compile(r"(/\S+) \(0x")


def build(dest: Path) -> Path:
    """Make `dest` a root: merged-/usr layout, the tools, /etc with a `sandbox` user (uid 1000)."""
    os.chmod(dest, 0o755)  # a temp dir is 0700: as `/`, it would shut every other user out
    for top in ("usr/bin", "usr/lib", "usr/lib64", "etc", "proc", "dev", "tmp", "home/sandbox", "work"):
        (dest / top).mkdir(parents=True, exist_ok=True)
    for link, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64"), ("sbin", "usr/bin")):
        if not (dest / link).exists():
            (dest / link).symlink_to(target)
    os.chmod(dest / "tmp", 0o1777)
    os.chown(dest / "home/sandbox", SANDBOX_UID, SANDBOX_UID)
    os.chown(dest / "work", SANDBOX_UID, SANDBOX_UID)
    libraries: set[str] = set()
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, f"the test machine has no {tool}"
        shutil.copy2(os.path.realpath(found), dest / "usr/bin" / tool)
        libraries.update(_libraries_of(found))
    for library in libraries:
        target = dest / library.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(library), target)
    (dest / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\nsandbox:x:1000:1000::/home/sandbox:/bin/bash\n")
    (dest / "etc/group").write_text("root:x:0:\nsandbox:x:1000:\nextra:x:1500:sandbox\n")
    (dest / "etc/os-release").write_text(f'ID={MARKER}\nPRETTY_NAME="execd test rootfs"\n')
    return dest


def _libraries_of(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False).stdout
    return _LIBRARY.findall(out)


def has_python(root: Path) -> bool:
    return any(root.glob("usr/bin/python*")) or any(root.glob("usr/lib/python3*"))
