"""API keys -> tenants. A tenant's name is also its KV cache salt."""

from __future__ import annotations

import hmac
from http import HTTPStatus

from kvmesh.server.errors import APIError


class KeyAuth:
    def __init__(self, keys: tuple[str, ...]):
        self._tenants: dict[str, str] = {}
        for entry in keys:
            key, _, tenant = entry.partition(":")
            self._tenants[key] = tenant or "default"

    @property
    def is_enabled(self) -> bool:
        return bool(self._tenants)

    def tenant(self, authorization: str | None) -> str | None:
        """The caller's tenant, None when auth is off. Raises 401 on a missing or bad key."""
        if not self._tenants:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(
                HTTPStatus.UNAUTHORIZED, "missing API key: send 'Authorization: Bearer <key>'"
            )
        for key, tenant in self._tenants.items():
            if hmac.compare_digest(key.encode(), token.strip().encode()):
                return tenant
        raise APIError(HTTPStatus.UNAUTHORIZED, "invalid API key")
