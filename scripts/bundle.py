#!/usr/bin/env python3
"""What a bundle made by scripts/bundle needs and weighs: `scripts/bundle.py DIR [--json]`.

- size: bytes on disk (`du`'s count: allocated blocks), and the number of files;
- the C library: the bundle links against glibc (libpython and every extension need it; PyInstaller
  never bundles the C library). musl-based images (Alpine) cannot run it;
- the minimum glibc: the highest `GLIBC_x.y` version that any ELF file of the bundle references
  (its version-needs section, as `readelf --version-info` lists it). `GLIBC_ABI_DT_RELR`, which
  binaries linked with packed relative relocations need, arrived with glibc 2.36;
- what the image must provide: the libraries the bundle's ELF files need (DT_NEEDED) and do not
  find in the bundle. Only glibc's own are expected (libc, libm, libdl, libpthread, the loader).

Standard library only (it runs before, or without, the build's venv); needs binutils' `readelf`,
which PyInstaller needs on Linux anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ELF_MAGIC = b"\x7fELF"
_GLIBC = re.compile(r"\bGLIBC_(\d+)\.(\d+)(?:\.(\d+))?\b")
_DT_RELR = "GLIBC_ABI_DT_RELR"
_DT_RELR_SINCE = (2, 36)
_NEEDED = re.compile(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]")
# The libraries of glibc itself (one package in every glibc distribution).
GLIBC_LIBRARY = re.compile(
    r"(libc|libm|libdl|libpthread|librt|libutil|libresolv|libanl|libmvec)\.so\.\d+|ld-linux[\w.-]*\.so\.\d+"
)


@dataclass
class Report:
    path: str
    bytes_on_disk: int
    files: int
    elf_files: int
    libc: str
    min_glibc: str  # e.g. "2.34"
    needed_by: list[str] = field(default_factory=list)  # the files that reference that version
    from_the_image: list[str] = field(default_factory=list)  # libraries needed and not in the bundle
    not_glibc: list[str] = field(default_factory=list)  # of those, any that glibc does not provide

    @property
    def megabytes(self) -> float:
        return self.bytes_on_disk / 1_000_000


def is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == ELF_MAGIC
    except OSError:
        return False


def glibc_versions(path: Path, readelf: str) -> set[tuple[int, ...]]:
    """The glibc versions one ELF file references (its .gnu.version_r entries)."""
    out = subprocess.run(
        [readelf, "--version-info", "--wide", str(path)], capture_output=True, text=True, check=True
    ).stdout
    needs = out.split("Version needs section", 1)[1] if "Version needs section" in out else ""
    found = {tuple(int(part) for part in match.groups() if part is not None) for match in _GLIBC.finditer(needs)}
    if _DT_RELR in needs:
        found.add(_DT_RELR_SINCE)
    return found


def needed_libraries(path: Path, readelf: str) -> set[str]:
    out = subprocess.run([readelf, "--dynamic", "--wide", str(path)], capture_output=True, text=True, check=True).stdout
    return set(_NEEDED.findall(out))


def bytes_on_disk(root: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in [".", *filenames]:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def report(root: Path) -> Report:
    readelf = shutil.which("readelf")
    if readelf is None:
        raise SystemExit("scripts/bundle.py: needs readelf (binutils: apt-get install binutils)")
    files = [Path(d, n) for d, _, names in os.walk(root) for n in names if not Path(d, n).is_symlink()]
    elves = [f for f in files if is_elf(f)]
    by_file = {f: glibc_versions(f, readelf) for f in elves}
    bundled = {f.name for f in files} | {p.name for p in root.rglob("*") if p.is_symlink()}
    from_the_image = sorted({lib for f in elves for lib in needed_libraries(f, readelf)} - bundled)
    highest = max((v for versions in by_file.values() for v in versions), default=None)
    if highest is None:
        raise SystemExit(f"scripts/bundle.py: no ELF file in {root} references glibc: is it a bundle?")
    return Report(
        path=str(root),
        bytes_on_disk=bytes_on_disk(root),
        files=len(files),
        elf_files=len(elves),
        libc="glibc",
        min_glibc=".".join(map(str, highest)),
        needed_by=sorted(str(f.relative_to(root)) for f, versions in by_file.items() if highest in versions),
        from_the_image=from_the_image,
        not_glibc=[lib for lib in from_the_image if not GLIBC_LIBRARY.fullmatch(lib)],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bundle.py", description=__doc__.split("\n", 1)[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    args = parser.parse_args(argv)
    found = report(args.bundle)
    if args.json:
        print(json.dumps({**asdict(found), "megabytes": round(found.megabytes, 1)}))
        return 0
    print(f"bundle:      {found.path}")
    print(f"size:        {found.megabytes:.1f} MB on disk ({found.files} files, {found.elf_files} ELF)")
    print(
        f"libc:        {found.libc} >= {found.min_glibc} (highest GLIBC_ version referenced, by {found.needed_by[0]})"
    )
    print("             needs a glibc-based image; musl-based ones (Alpine) cannot run it")
    print(f"from image:  {', '.join(found.from_the_image)}")
    if found.not_glibc:
        print(f"             not glibc's, so the image must have them too: {', '.join(found.not_glibc)}")
    print(f"entry:       {found.path}/execd serve (no Python needed, bash for the sessions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
