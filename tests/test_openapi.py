"""The OpenAPI document: valid OpenAPI 3.1, served behind the token, in step with the routes the
app serves and the objects it answers, and schemathesis finding nothing against a live daemon."""

from __future__ import annotations

from collections.abc import Iterator

import jsonschema
import pytest
from aiohttp import web
from openapi_spec_validator import validate

from execd.api import create_app, openapi
from execd.config import Settings
from tests import schemathesis_runner
from tests.conftest import Daemon, DaemonFactory, parse_sse
from tests.helpers_control import ServedDaemon, served

TOKEN = "openapi-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Per operation; the long run is `scripts/schemathesis-run` (10,000+ cases).
EXAMPLES_PER_OPERATION = 25


def served_routes(app: web.Application) -> set[tuple[str, str]]:
    """(METHOD, path template) of every route the app serves, but HEAD (aiohttp adds one per GET),
    the fallback that answers JSON 404/405 for everything else, and a mounted sub-application's: it
    speaks another API's dialect (the OpenSandbox adapter, docs/opensandbox.md), not this contract."""
    routes = set()
    for resource in app.router.resources():
        if isinstance(resource, web.PrefixedSubAppResource):
            continue
        for route in resource:
            if route.method not in ("HEAD", "*"):
                routes.add((route.method, resource.canonical))
    return routes


def documented_routes() -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in openapi.document()["paths"].items() for method in item}


def drift(app: web.Application) -> set[tuple[str, str]]:
    """Routes served but not documented, or documented but not served."""
    return served_routes(app) ^ documented_routes()


async def _nothing(request: web.Request) -> web.Response:
    return web.Response()


def test_the_document_is_valid_openapi_3_1() -> None:
    validate(openapi.document())
    assert openapi.document()["openapi"] == "3.1.0"


def test_no_drift_every_route_served_is_documented_and_every_documented_route_is_served() -> None:
    app = create_app(Settings())
    assert drift(app) == set()
    # The check would catch a route added without its documentation.
    app.router.add_get("/session/{session_id}/undocumented", _nothing)
    assert drift(app) == {("GET", "/session/{session_id}/undocumented")}


async def test_no_drift_session_and_run_objects_carry_exactly_the_documented_properties(daemon: Daemon) -> None:
    session = await daemon.create(labels={"k": "v"})
    jsonschema.validate(session, openapi.SESSION)
    assert set(session) == set(openapi.SESSION["properties"])
    sid = session["session_id"]
    response = await daemon.client.post(f"/session/{sid}/run", json={"code": "echo hi", "background": True})
    run = await response.json()
    jsonschema.validate(run, openapi.RUN)
    assert set(run) == set(openapi.RUN["properties"])
    detail = await (await daemon.client.get(f"/session/{sid}")).json()
    jsonschema.validate(detail, openapi.SESSION_WITH_RESOURCES)


async def test_no_drift_every_event_matches_its_schema(make_daemon: DaemonFactory) -> None:
    daemon = await make_daemon(run_log_bytes=2048)
    sid = (await daemon.create())["session_id"]
    events = list((await daemon.run(sid, "echo out; echo err >&2")).events)
    # A background run whose log drops events: its replay starts with a gap.
    started = await daemon.client.post(f"/session/{sid}/run", json={"code": "seq 1 3000", "background": True})
    run_id = (await started.json())["run_id"]
    async with daemon.client.get(f"/session/{sid}/runs/{run_id}/events", params={"after": "0"}) as replay:
        events += parse_sse(await replay.read())
    # A run its session's DELETE ends: an error event.
    async with daemon.client.post(f"/session/{sid}/run", json={"code": "echo go; sleep 30"}) as stream:
        head = await stream.content.readuntil(b"go")
        await daemon.delete(sid)
        events += parse_sse(head + await stream.read())
    for event in events:
        jsonschema.validate(event.data, openapi.EVENTS[event.type])
    assert {e.type for e in events} == set(openapi.EVENTS)


def test_no_drift_the_validator_takes_its_fields_from_the_documents_request_schemas() -> None:
    from execd.api import validation

    assert set(openapi.SESSION_REQUEST["properties"]) == validation.SESSION_FIELDS
    assert set(openapi.RUN_REQUEST["properties"]) == validation.RUN_FIELDS
    assert set(openapi.STDIN_REQUEST["properties"]) == validation.STDIN_FIELDS
    assert set(openapi.INTERRUPT_REQUEST["properties"]) == validation.INTERRUPT_FIELDS


# ----- a live daemon ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedDaemon]:
    """A daemon with a token; runs end within 2 s whatever code schemathesis makes up, and run as
    `nobody` where the suite may switch users."""
    token = tmp_path_factory.mktemp("openapi") / "token"
    token.write_text(TOKEN)
    args = ["--access-token-file", str(token), *schemathesis_runner.DAEMON_ARGS, "--idle-timeout-s", "30"]
    with served(*args, *_as_nobody()) as daemon:
        yield daemon


def _as_nobody() -> list[str]:
    import os

    return ["--run-as", "nobody"] if os.geteuid() == 0 else []


def test_the_document_is_served_behind_the_token(live: ServedDaemon) -> None:
    import json
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{live.url}/openapi.json", timeout=10)
    assert refused.value.code == 401
    request = urllib.request.Request(f"{live.url}/openapi.json", headers=AUTH)
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.loads(response.read()) == openapi.document()


def test_schemathesis_finds_nothing(live: ServedDaemon) -> None:
    """Every operation, schemathesis's default checks (no server error, documented status codes
    and content types, answers that conform to their schemas), a bounded number of cases each."""
    outcome = schemathesis_runner.run(live.url, AUTH, EXAMPLES_PER_OPERATION)
    assert not outcome.failures, "\n\n".join(f"{op}: {why}" for op, why in outcome.failures.items())
    # Every operation was called, but the document's own (schemathesis leaves the schema's URL alone).
    expected = {f"{method} {path}" for method, path in documented_routes()} - {"GET /openapi.json"}
    assert set(outcome.calls) == expected, sorted(outcome.calls)
    print(f"\nschemathesis: {outcome.cases} cases over {len(outcome.calls)} operations")
