"""The HTTP layer: thin aiohttp handlers over the registry."""

from execd.api.app import create_app

__all__ = ["create_app"]
