"""Optional bearer-key auth: an API key for inference endpoints, a separate admin key for head management.

Admin endpoints are off (404) unless ``ARBITER_ADMIN_KEY`` is set. Keys are compared in constant time.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import AuthError, NotFound, PermissionDenied


def _bearer(request: Request) -> str | None:
    h = request.headers.get("authorization")
    if not h:
        return None
    scheme, _, token = h.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


async def require_api_key(request: Request) -> None:
    s = request.app.state.arbiter.settings
    if s.api_key is None:
        return
    token = _bearer(request)
    if token is None:
        raise AuthError("missing API key: send `Authorization: Bearer <key>`", code="missing_api_key")
    admin = s.admin_key.get_secret_value() if s.admin_key else None
    if not (_matches(token, s.api_key.get_secret_value()) or (admin is not None and _matches(token, admin))):
        raise AuthError("invalid API key", code="invalid_api_key")


async def require_admin(request: Request) -> None:
    s = request.app.state.arbiter.settings
    if s.admin_key is None:
        raise NotFound("admin endpoints are disabled (set ARBITER_ADMIN_KEY to enable them)", code="admin_disabled")
    token = _bearer(request)
    if token is None:
        raise AuthError("missing admin key: send `Authorization: Bearer <admin key>`", code="missing_api_key")
    if not _matches(token, s.admin_key.get_secret_value()):
        if s.api_key is not None and _matches(token, s.api_key.get_secret_value()):
            raise PermissionDenied("this key may call inference endpoints but not admin ones", code="not_admin")
        raise AuthError("invalid admin key", code="invalid_api_key")
