"""The documentation stands on its own and keeps up with the code: nothing in the repository points
outside it, and every route, error code and setting the code has is in docs/, every link resolves.
Each check reads the code (the app's router, the error modules, the settings), not a list kept here,
so adding a route, a code or a setting without documenting it fails a test."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import unicodedata
from pathlib import Path

import pytest

from execd.api import create_app
from execd.config import Settings

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
API_DOC = DOCS / "api.md"
OPERATIONS_DOC = DOCS / "operations.md"
# The catch-all `/{path:.*}` of execd/api/server.py (404/405 for everything else); aiohttp's
# canonical form of it drops the regex.
FALLBACK_ROUTE = "/{path}"
# The specification's directory beside the checkout, which a clone does not have (spelled in two
# parts, so that this file does not contain it).
OUTSIDE = b"/".join([b"..", b"shared"])
CODE_NAME = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*\Z")


def _tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name]


def test_no_tracked_file_points_outside_the_repository() -> None:
    offenders = []
    for name in _tracked_files():
        if name.startswith(".ci/"):
            continue
        path = REPO / name
        if path.is_file() and OUTSIDE in path.read_bytes():
            offenders.append(name)
    assert not offenders, f"these files mention {OUTSIDE.decode()}, which a clone does not have: {offenders}"


def _served_routes() -> list[tuple[str, str]]:
    app = create_app(Settings())
    routes = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if route.method == "HEAD" or path == FALLBACK_ROUTE:
            continue
        routes.add((route.method, path))
    return sorted(routes, key=lambda r: (r[1], r[0]))


def test_the_app_serves_routes_for_the_docs_check_to_see() -> None:
    routes = _served_routes()
    assert ("POST", "/session") in routes
    assert ("GET", "/session/{session_id}/runs/{run_id}/events") in routes


@pytest.mark.parametrize(("method", "path"), _served_routes(), ids=lambda value: str(value))
def test_every_route_is_in_the_api_doc(method: str, path: str) -> None:
    # `GET /session` must not count as documenting `GET /session/{session_id}`: the path ends there.
    pattern = re.compile(re.escape(f"{method} {path}") + r"(?![\w/{])")
    assert pattern.search(API_DOC.read_text()), f"`{method} {path}` is served but not in docs/api.md"


def error_codes() -> set[str]:
    """Every error code the daemon can answer or end a run with: the constants of the one map from
    errors to codes (execd/api/errors.py), and the codes given literally anywhere in the package
    (to `ApiError`, `error_response` or `Aborted`, or as a `"code"` in a body)."""
    codes = set()
    errors = ast.parse((REPO / "execd" / "api" / "errors.py").read_text())
    for node in ast.walk(errors):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and CODE_NAME.match(node.value):
            codes.add(node.value)
    for module in (REPO / "execd").rglob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", ""))
                position = {"ApiError": 1, "error_response": 1, "Aborted": 0}.get(name)
                if position is not None and len(node.args) > position:
                    arg = node.args[position]
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        codes.add(arg.value)
            elif isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if (
                        isinstance(key, ast.Constant)
                        and key.value == "code"
                        and isinstance(value, ast.Constant)
                        and isinstance(value.value, str)
                    ):
                        codes.add(value.value)
            elif isinstance(node, ast.Constant) and isinstance(node.value, bytes):
                codes.update(m.decode() for m in re.findall(rb'"code":\s*"([A-Z_]+)"', node.value))
    return codes


def test_the_error_codes_are_found_in_the_code() -> None:
    codes = error_codes()
    # A few the contract names, found by reading the modules: the scan itself works.
    assert {"INVALID_REQUEST", "SESSION_NOT_FOUND", "UNAUTHORIZED", "SESSION_DIED", "RESOURCE_EXHAUSTED"} <= codes
    assert all(CODE_NAME.match(code) for code in codes), codes


@pytest.mark.parametrize("code", sorted(error_codes()))
def test_every_error_code_is_in_the_api_doc(code: str) -> None:
    assert re.search(rf"`{code}`", API_DOC.read_text()), f"error code {code} is not in docs/api.md"


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(Settings)])
def test_every_setting_is_in_the_operations_doc(name: str) -> None:
    text = OPERATIONS_DOC.read_text()
    flag, variable = "--" + name.replace("_", "-"), Settings.env_name(name)
    assert f"`{flag}`" in text, f"setting {name}: its flag {flag} is not in docs/operations.md"
    assert f"`{variable}`" in text, f"setting {name}: its variable {variable} is not in docs/operations.md"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _anchors(markdown: str) -> set[str]:
    """The anchors GitHub makes of a page's headings: lower case, punctuation dropped, spaces to
    hyphens, `-1`, `-2`... for repeats."""
    seen: dict[str, int] = {}
    anchors = set()
    for line in FENCE.sub("", markdown).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1)).lower()
        slug = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN").replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _pages() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def test_the_docs_exist() -> None:
    assert {p.name for p in DOCS.glob("*.md")} >= {"api.md", "architecture.md", "operations.md", "performance.md"}


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        path = (page.parent / file_part).resolve() if file_part else page
        if not path.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path.read_text()):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(REPO)}: broken links: {broken}"
