"""Tenants: one YAML file that the router and the instances both read. Pure (a clock is passed).

    tenants:
      chat:                      # the tenant's name
        api_keys: [sk-chat-1]    # who is this tenant (Authorization: Bearer <key>)
        priority: 0              # class: lower is more urgent (the `priority` policy)
        ttft_slo_s: 1.0          # deadline for `edf`, and what admission control predicts
        tpot_slo_s: 0.1          # reported (goodput); not enforced per step
        weight: 1.0              # share under the `fair` policy
        requests_per_min: 600    # rate limits (429 + Retry-After); unset: unlimited
        tokens_per_min: 200000   # prompt + max_tokens on admission, settled with what it used
        cache_salt: chat         # KV namespace (default: the tenant's name)

A tenant's cache salt is folded into its block keys, so tenants never share KV unless they
name the same salt. Block keys are public hashes: whoever can read an instance's KV events
or /kv/snapshot and guess a tenant's salt can test whether a prompt is cached, so keep
those endpoints on the router's network, or make the salt a secret.
"""

from __future__ import annotations

import hmac
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvmesh.types import TenantClass

FIELDS = ("api_keys", "priority", "ttft_slo_s", "tpot_slo_s", "weight", "requests_per_min",
          "tokens_per_min", "cache_salt")


@dataclass(frozen=True)
class Tenant:
    name: str
    api_keys: tuple[str, ...] = ()
    priority: int = 0
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None
    weight: float = 1.0
    requests_per_min: float | None = None
    tokens_per_min: float | None = None
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a tenant needs a name")
        for name in ("ttft_slo_s", "tpot_slo_s", "requests_per_min", "tokens_per_min"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and value > 0):
                raise ValueError(f"tenant {self.name!r}: {name} must be > 0, got {value!r}")
        if self.requests_per_min is not None and self.requests_per_min < 1:
            raise ValueError(f"tenant {self.name!r}: requests_per_min must be >= 1")
        if not (isinstance(self.weight, int | float) and self.weight > 0):
            raise ValueError(f"tenant {self.name!r}: weight must be > 0, got {self.weight!r}")
        if not isinstance(self.priority, int):
            raise ValueError(f"tenant {self.name!r}: priority must be an integer")

    @property
    def salt(self) -> str:
        return self.cache_salt or self.name

    @property
    def request_class(self) -> TenantClass:
        return TenantClass(self.name, self.ttft_slo_s, float(self.weight), self.tpot_slo_s)


def cache_salt(tenant_salt: str | None, body_salt: str | None) -> str | None:
    """The salt a request's block keys use: its tenant's, then the request's own (so a
    client can split its KV further but never reach another tenant's)."""
    if tenant_salt is None:
        return body_salt
    return f"{len(tenant_salt)}:{tenant_salt}:{body_salt or ''}"  # unambiguous: no collisions


class TenantTable:
    """API key -> tenant. Empty: auth is off and every request is anonymous."""

    def __init__(self, tenants: list[Tenant]):
        self.tenants = {t.name: t for t in tenants}
        if len(self.tenants) != len(tenants):
            raise ValueError("tenant names must be unique")
        self._by_key: dict[bytes, Tenant] = {}
        for t in tenants:
            for key in t.api_keys:
                if key.encode() in self._by_key:
                    raise ValueError(f"API key of tenant {t.name!r} is also another tenant's")
                self._by_key[key.encode()] = t

    @classmethod
    def from_keys(cls, entries: tuple[str, ...]) -> TenantTable:
        """`--api-keys KEY[:TENANT],...`: tenants with nothing but a name."""
        keys: dict[str, list[str]] = {}
        for entry in entries:
            key, _, name = entry.partition(":")
            keys.setdefault(name or "default", []).append(key)
        return cls([Tenant(name, tuple(k)) for name, k in keys.items()])

    @classmethod
    def load(cls, path: str | Path, extra_keys: tuple[str, ...] = ()) -> TenantTable:
        """Parse a tenants file (ValueError with the file's name on any mistake)."""
        try:
            doc = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read tenants file {path}: {exc}") from exc
        items = doc.get("tenants") if isinstance(doc, dict) else None
        if not isinstance(items, dict):
            raise ValueError(f"{path}: expected a mapping under 'tenants:'")
        tenants = [_parse(name, spec, path) for name, spec in items.items()]
        return cls(tenants + list(cls.from_keys(extra_keys).tenants.values()))

    @property
    def is_enabled(self) -> bool:
        return bool(self._by_key)

    def lookup(self, token: str) -> Tenant | None:
        """The tenant whose key this is, compared in constant time per key."""
        raw = token.strip().encode()
        found = None
        for key, tenant in self._by_key.items():
            if hmac.compare_digest(key, raw):
                found = tenant
        return found


def _parse(name: Any, spec: Any, path: str | Path) -> Tenant:
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: tenant {name!r} must be a mapping")
    unknown = set(spec) - set(FIELDS)
    if unknown:
        raise ValueError(f"{path}: tenant {name!r} has unknown keys {sorted(unknown)}; "
                         f"known: {', '.join(FIELDS)}")
    keys = spec.get("api_keys", ())
    if isinstance(keys, str) or not all(isinstance(k, str) and k for k in keys):
        raise ValueError(f"{path}: tenant {name!r}: api_keys must be a list of strings")
    if not keys:
        raise ValueError(f"{path}: tenant {name!r} has no api_keys (nobody could use it)")
    try:
        return Tenant(str(name), **{**spec, "api_keys": tuple(keys)})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from exc


@dataclass
class _Bucket:
    level: float
    updated_s: float


@dataclass
class RateLimiter:
    """Token buckets per tenant: `requests_per_min` and `tokens_per_min`, each refilled
    continuously and holding at most one minute's worth."""

    _buckets: dict[tuple[str, str], _Bucket] = field(default_factory=dict)

    def admit(self, tenant: Tenant, num_tokens: int, now_s: float) -> float | None:
        """Charge one request of `num_tokens`: None if admitted, else the seconds after
        which it would be (nothing is charged then)."""
        limits = [("requests", tenant.requests_per_min, 1.0),
                  ("tokens", tenant.tokens_per_min, float(num_tokens))]
        waits = [self._wait(tenant.name, kind, per_min, cost, now_s)
                 for kind, per_min, cost in limits if per_min is not None]
        if any(w > 0 for w in waits):
            return max(waits)
        for kind, per_min, cost in limits:
            if per_min is not None:
                self._buckets[(tenant.name, kind)].level -= cost
        return None

    def settle(self, tenant: Tenant, charged: int, used: int, now_s: float) -> None:
        """A request ended having used `used` tokens where `charged` were taken up front:
        the difference goes back to (or comes out of) the tenant's token bucket. A request
        that set no max_tokens is charged its prompt only, then its output here; the
        bucket may go below zero, and the tenant's next requests wait until it refills."""
        if tenant.tokens_per_min is None or used == charged:
            return
        self._wait(tenant.name, "tokens", tenant.tokens_per_min, 0.0, now_s)  # refill to now
        bucket = self._buckets[(tenant.name, "tokens")]
        bucket.level = min(float(tenant.tokens_per_min), bucket.level + charged - used)

    def _wait(self, name: str, kind: str, per_min: float, cost: float, now_s: float) -> float:
        bucket = self._buckets.setdefault((name, kind), _Bucket(per_min, now_s))
        rate = per_min / 60.0
        bucket.level = min(per_min, bucket.level + (now_s - bucket.updated_s) * rate)
        bucket.updated_s = now_s
        if cost > per_min:
            return math.inf  # bigger than a minute's budget: it never fits
        return max(0.0, (cost - bucket.level) / rate)
