"""Typed keys for what the application holds (no module-level state: many daemons per process)."""

from aiohttp import web

from execd.config import Settings
from execd.metrics import Metrics
from execd.registry import Registry

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", Registry)
METRICS = web.AppKey("metrics", Metrics)
STARTED_AT = web.AppKey("started_at", float)
