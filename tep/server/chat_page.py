"""The chat page served at ``GET /`` (``ServerConfig.ui``): one static HTML file with its
script inline, shipped as package data (``tep/server/static/chat.html``).

The page talks to this server only, with relative URLs (``v1/models``,
``v1/chat/completions``); its Content-Security-Policy makes the browser refuse anything
else, so it works offline and cannot be made to load or send to other origins.
"""
from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

__all__ = ["chat_page", "PAGE_HEADERS"]

PAGE_HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Security-Policy",
     "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
     "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
     "frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
)
"""Sent with the page: only inline script/style and requests to this origin; the page
holds an API key field, so no other site may frame it."""


@lru_cache(maxsize=1)
def chat_page() -> bytes:
    """The page's bytes (UTF-8 HTML), read from the package once."""
    return files("tep.server").joinpath("static/chat.html").read_bytes()
