"""API keys: ``Authorization: Bearer <key>`` (or Anthropic's ``x-api-key: <key>``) on
``/v1`` routes and the text routes (:func:`tep.wire.routes.needs_key`).

Keys are compared in constant time: the presented key and every accepted key are hashed
to 32-byte SHA-256 digests (so lengths never leak) and every digest is compared with
``hmac.compare_digest`` without stopping at the first match.

A key's *principal ID* names it in run events and logs without revealing it:
``"key-" + sha256("tep-principal\\0" + key)[:12 hex]``. It is stable across workers,
replicas and restarts, so a log can be grouped by caller. It is a hash: a short,
guessable key could be found from it by trying candidates, so use long random keys
(``python -c "import secrets; print(secrets.token_urlsafe(32))"``).
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Iterable

__all__ = ["KeyChecker", "principal_id"]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def principal_id(key: str) -> str:
    """The public name of ``key`` (see the module docstring)."""
    return "key-" + hashlib.sha256(b"tep-principal\0" + key.encode("utf-8")).hexdigest()[:12]


class KeyChecker:
    """Checks ``Authorization`` header values against a set of accepted keys.

    Args:
        keys: the accepted keys; empty means authentication is off.
    """

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [(_digest(k), principal_id(k)) for k in keys]

    @property
    def enabled(self) -> bool:
        """True when at least one key is configured."""
        return bool(self._keys)

    def check(self, authorization: str | None) -> str | None:
        """The principal ID of the key in an ``Authorization`` header, or None when the
        header is missing, not ``Bearer``, or names no accepted key."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self.check_key(token.strip())

    def check_key(self, key: str | None) -> str | None:
        """The principal ID of a bare key (the ``x-api-key`` header), or None."""
        if not key:
            return None
        presented = _digest(key)
        found = None
        for digest, pid in self._keys:  # no early exit: time does not depend on the match
            if hmac.compare_digest(presented, digest):
                found = pid
        return found
