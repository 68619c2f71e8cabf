"""Routes of sessions: create, list, get (with resources), delete."""

from __future__ import annotations

import asyncio

from aiohttp import web

from execd.api.errors import json_response
from execd.api.keys import REGISTRY
from execd.api.server import expect_continue
from execd.api.validation import read_json, session_spec


async def create_session(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    spec = session_spec(await read_json(request), registry.place())
    session = await registry.open(spec)
    return json_response(session.to_dict())  # 200, not 201: the OpenSandbox SDKs accept only 200


async def list_sessions(request: web.Request) -> web.Response:
    return json_response({"sessions": [s.to_dict() for s in request.app[REGISTRY].sessions.values()]})


async def get_session(request: web.Request) -> web.Response:
    session = request.app[REGISTRY].get(request.match_info["session_id"])
    resources = await asyncio.to_thread(session.resources)
    return json_response({**session.to_dict(), "resources": resources})


async def delete_session(request: web.Request) -> web.Response:
    return json_response(await request.app[REGISTRY].delete(request.match_info["session_id"]))


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/session", create_session, expect_handler=expect_continue)
    router.add_get("/session", list_sessions, expect_handler=expect_continue)
    router.add_get("/session/{session_id}", get_session, expect_handler=expect_continue)
    router.add_delete("/session/{session_id}", delete_session, expect_handler=expect_continue)
