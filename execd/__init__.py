"""execd: persistent bash sessions over HTTP, streamed as Server-Sent Events."""

__version__ = "0.1.0"
