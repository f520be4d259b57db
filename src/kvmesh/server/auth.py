"""API keys -> tenants (`kvmesh.tenants`), and their rate limits, at the HTTP edge."""

from __future__ import annotations

import math
import time
from http import HTTPStatus

from kvmesh.server.errors import APIError
from kvmesh.tenants import RateLimiter, Tenant, TenantTable


class KeyAuth:
    def __init__(self, table: TenantTable):
        self.table = table
        self._limiter = RateLimiter()

    @property
    def is_enabled(self) -> bool:
        return self.table.is_enabled

    def tenant(self, authorization: str | None) -> Tenant | None:
        """The caller's tenant, None when auth is off. Raises 401 on a missing or bad key."""
        if not self.table.is_enabled:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(
                HTTPStatus.UNAUTHORIZED, "missing API key: send 'Authorization: Bearer <key>'"
            )
        tenant = self.table.lookup(token)
        if tenant is None:
            raise APIError(HTTPStatus.UNAUTHORIZED, "invalid API key")
        return tenant

    def charge(self, tenant: Tenant | None, num_tokens: int) -> None:
        """Apply the tenant's rate limits to one request: 429 with Retry-After when over,
        400 when the request alone is more than a minute's token budget."""
        if tenant is None:
            return
        wait_s = self._limiter.admit(tenant, num_tokens, time.monotonic())
        if wait_s is None:
            return
        if math.isinf(wait_s):
            raise APIError(HTTPStatus.BAD_REQUEST,
                           f"request needs {num_tokens} tokens, more than tenant "
                           f"{tenant.name!r}'s tokens_per_min ({tenant.tokens_per_min})")
        raise APIError(HTTPStatus.TOO_MANY_REQUESTS,
                       f"tenant {tenant.name!r} is over its rate limit",
                       err_type="rate_limit_exceeded", reason="rate_limit",
                       headers={"Retry-After": str(max(1, math.ceil(wait_s)))})

    def settle(self, tenant: Tenant | None, charged: int, used: int) -> None:
        """Square a request's up-front charge with what it used (`RateLimiter.settle`)."""
        if tenant is not None:
            self._limiter.settle(tenant, charged, used, time.monotonic())
