"""`kvmesh router`'s configuration (a section of the same CLI and config files as the
engine's: see `kvmesh.config`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvmesh.config import DEFAULT_MODEL
from kvmesh.config_keys import help_field as _help


@dataclass(frozen=True)
class RouterConfig:
    """`kvmesh router`: one OpenAI-compatible endpoint in front of N instances."""

    SECTION: ClassVar[str] = "router"

    host: str = _help("Address to listen on.", default="127.0.0.1")
    port: int = _help("TCP port to listen on.", default=8080)
    instances: tuple[str, ...] = _help(
        "Instance base URLs, comma-separated (http://HOST:PORT).", default=())
    policy: str = _help(
        "Routing policy: round_robin, least_load, prefix (the router's own approximate "
        "index; any OpenAI-compatible server), kv (exact, from the instances' KV events) or "
        "session (sticky by the X-Session-Id header or the `user` field).", default="kv")
    tenants: str | None = _help("Tenants file (YAML), the same one the instances read.",
                                default=None)
    api_keys: tuple[str, ...] = _help("Accepted API keys, as KEY or KEY:TENANT.", default=())
    upstream_api_key: str | None = _help(
        "An API key the instances accept, sent with the router's own requests to them "
        "(/load, /kv/snapshot, /mesh: behind the instances' API keys when they have any). "
        "Clients' requests pass on with the clients' own keys.", default=None)
    model: str = _help(
        "Model whose tokenizer and chat template the `kv` policy uses to compute block "
        "keys (the instances' model).", default=DEFAULT_MODEL)
    load_cost_tokens: float | None = _help(
        "Cost of one more request in flight on an instance, in prefill tokens (the "
        "cache-aware policies' trade-off; docs/router.md). Unset: 256 for kv and session, "
        "512 for prefix.", default=None)
    queue_weight: float = _help(
        "Cost of one prefill token queued on an instance (its /load num_prefill_tokens, "
        "plus what the router sent since), in prefill tokens.", default=1.0)
    chars_per_token: float = _help("prefix: characters per token of matched text.",
                                   default=4.0)
    session_max_imbalance: int = _help(
        "session: move a session when its home carries this many more requests than the "
        "least-loaded instance.", default=4)
    poll_interval_s: float = _help("Seconds between health and load probes.", default=0.5)
    discover_mesh: bool = _help(
        "Also route to every member of the instances' peer mesh: each healthy instance's "
        "GET /mesh is read every discover_interval_s, and a member the router does not know "
        "yet (by its HTTP URL) joins the rotation; a discovered member out of rotation for 12 "
        "intervals (at least 60 s) and no longer listed is forgotten. The --instances are "
        "then only the seeds.",
        default=False)
    discover_interval_s: float = _help("Seconds between reads of /mesh (--discover-mesh).",
                                       default=5.0)
    max_attempts: int = _help(
        "Instances tried per request before any byte reaches the client.", default=3)
    connect_timeout_s: float = _help("Connect timeout to an instance.", default=2.0)
    request_timeout_s: float = _help(
        "Longest wait for an instance's first byte, and between later bytes.", default=600.0)
    client_stall_timeout_s: float = _help(
        "A client that takes nothing of its answer for this long (connected, but not "
        "reading) is dropped, and its request ended on the instance (0: wait forever).",
        default=60.0)
    log_level: str = _help("Log level: debug, info, warning, error.", default="info")

    def __post_init__(self) -> None:
        if isinstance(self.instances, str):
            object.__setattr__(self, "instances",
                               tuple(u for u in self.instances.split(",") if u))
        if isinstance(self.api_keys, str):
            object.__setattr__(self, "api_keys", tuple(k for k in self.api_keys.split(",") if k))
        if not self.instances:
            raise ValueError("name at least one instance: --instances http://HOST:PORT,...")
        bad = [u for u in self.instances if not u.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"instance URLs must start with http:// or https://: {bad}")
        if self.max_attempts < 1 or self.poll_interval_s <= 0 or self.discover_interval_s <= 0:
            raise ValueError("max_attempts must be >= 1, poll_interval_s and "
                             "discover_interval_s > 0")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.client_stall_timeout_s < 0:
            raise ValueError("client_stall_timeout_s must be >= 0")
