"""Frozen, validated configuration: one dataclass per subsystem.

Each field's `help` metadata is its documentation; the CLI builds its --help from it and
accepts every field as a flag, a KVMESH_* environment variable, or a key in a YAML/TOML file.
Each class names its SECTION; `section_field` names a field without ambiguity, and a bare field
name stays an alias for the first class (in a given list) that owns it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvmesh.config_keys import UnknownConfigKeys, field_help, split_by_section
from kvmesh.config_keys import help_field as _help

__all__ = ["UnknownConfigKeys", "field_help", "split_by_section"]

DEFAULT_MODEL = "smollm2-135m-instruct"
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "native", "sdpa")
QUANTIZATIONS = ("auto", "none", "int8", "int4")
QUANT_ACTIVATIONS = ("float32", "int8")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to run and how."""

    SECTION: ClassVar[str] = "model"

    model: str = _help(
        "Model name from `kvmesh model list`, a local Hugging Face directory, or a .gguf file.",
        default=DEFAULT_MODEL,
    )
    dtype: str = _help(
        "Compute dtype: auto (bfloat16 on CUDA and on CPUs with AVX512_BF16 or AMX, float32 "
        "on other CPUs), float32 (the exact path that matches transformers), bfloat16 or "
        "float16.",
        default="auto",
    )
    quantization: str = _help(
        "Weight-only quantization of the linear layers (CPU: float32 compute, or bfloat16 "
        "where the CPU has native bf16): auto (int4 or "
        "int8 per group of 32 where that reproduces the weights exactly, as for a model "
        "converted from a Q4_1/Q8_0 GGUF; float elsewhere), none (float weights), int8 "
        "(symmetric per group) or int4 (affine per group; lm_head int8).",
        default="auto",
    )
    quant_activations: str = _help(
        "Inputs of int4 linears under float32 compute on the CPU: float32 (exact products on "
        "the int4 weights: a model converted from a Q4_1 GGUF gives the float32 model's "
        "tokens) or int8 (rounded per group of 32 and multiplied as integers, as llama.cpp "
        "runs Q4 x Q8; needs AVX2; faster prefill, close to float32 but not equal). bfloat16 "
        "models keep their bf16 path.",
        default="float32",
    )
    device: str = _help("torch device: auto, cpu or cuda[:N].", default="auto")
    max_model_len: int | None = _help(
        "Longest prompt + output in tokens (default: the model's context length).", default=None
    )
    num_threads: int | None = _help("torch CPU threads (default: torch's own).", default=None)
    attention_backend: str = _help(
        "Attention: auto (native CPU kernels that read KV blocks in place, for decode in "
        "every dtype and for bf16 prefill, when they can be built and the compute and KV "
        "dtypes match; else gather + torch SDPA), native (the decode kernel, or an error) "
        "or sdpa.",
        default="auto",
    )
    warmup: bool = _help(
        "Run a short prefill and two decode steps at startup, before taking requests, so "
        "the first request does not pay the backends' one-time setup (about 0.07 s at "
        "startup on the default model on 2 vCPUs).",
        default=True,
    )

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}"
            )
        if self.quant_activations not in QUANT_ACTIVATIONS:
            raise ValueError(f"quant_activations must be one of {QUANT_ACTIVATIONS}, "
                             f"got {self.quant_activations!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, "
                f"got {self.attention_backend!r}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    """The device KV cache: paged, block-major, with a prefix index."""

    SECTION: ClassVar[str] = "cache"

    block_size: int = _help("Tokens per KV block.", default=16)
    kv_dtype: str = _help(
        "KV cache dtype: auto (the compute dtype), float32, bfloat16, float16.", default="auto"
    )
    kv_cache_memory_bytes: int = _help(
        "Memory budget for the device KV cache, in bytes.", default=2 * 1024**3
    )
    num_blocks: int | None = _help(
        "Exact number of KV blocks (overrides the byte budget).", default=None
    )
    enable_prefix_caching: bool = _help("Reuse KV blocks across requests by prefix.", default=True)
    prefault_bytes: int = _help(
        "CPU: keep this much of the KV pool's memory mapped ahead of the blocks in use (the "
        "first at startup, the rest on a background thread), so that filling fresh blocks "
        "(a long prompt, a host or peer hit) does not pay page faults on the request's path "
        "(0: map pages on first use).",
        default=256 * 1024**2)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size > 1024:
            raise ValueError(f"block_size must be in [1, 1024], got {self.block_size}")
        if self.kv_dtype not in DTYPES:
            raise ValueError(f"kv_dtype must be one of {DTYPES}, got {self.kv_dtype!r}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_memory_bytes < 1:
            raise ValueError("kv_cache_memory_bytes must be positive")
        if self.prefault_bytes < 0:
            raise ValueError("prefault_bytes must be >= 0")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching: what runs in each engine step."""

    SECTION: ClassVar[str] = "scheduler"

    max_num_seqs: int = _help("Most sequences running at once.", default=128)
    max_num_batched_tokens: int = _help(
        "Token budget per step, shared by decodes and chunked prefills.", default=512
    )
    policy: str = _help(
        "Queue order: fcfs, priority (the tenant's class, then the request's), edf (earliest "
        "TTFT deadline from the tenant's SLO) or fair (a virtual token counter per tenant).",
        default="fcfs")
    max_waiting: int = _help(
        "Most requests waiting in the queue before new ones are refused.", default=1024
    )
    admission_control: bool = _help(
        "Refuse at once (429 + Retry-After) a request whose predicted TTFT, from the queue "
        "ahead of it and the measured prefill rate, exceeds its tenant's TTFT SLO.",
        default=True)
    default_ttft_slo_s: float = _help(
        "edf: the deadline of a request whose tenant has no TTFT SLO (arrival + this), so "
        "work without an SLO still ages to the front.", default=60.0)
    slo_step_fraction: float = _help(
        "Once a tenant with a TTFT SLO has sent a request, each step's prefill tokens are "
        "capped at (measured prefill rate x the tightest such SLO x this), so a request "
        "arriving mid-step waits only this share of its SLO for the step to end. Decodes "
        "are not capped, and the cap never falls below this share of the token budget. 0 "
        "turns the cap off.", default=0.125)
    speculative_method: str | None = _help(
        "Speculative decoding: ngram (prompt lookup: draft what followed the last earlier "
        "match of the sequence's end), draft (a smaller model with the same vocabulary "
        "drafts greedily: --speculative-model) or unset (off).", default=None)
    speculative_model: str | None = _help(
        "The draft model for --speculative-method draft: a name from `kvmesh model list`, a "
        "local Hugging Face directory or a .gguf file, with the target's vocabulary. It "
        "runs in the target's dtype, on a paged KV cache of its own (speculative_max_seqs "
        "sequences of the longest length, within a quarter of the target's KV pool bytes).",
        default=None)
    speculative_quantization: str = _help(
        "Weight-only quantization of the draft model, as --quantization (int4 makes a "
        "cheap draft of a float32 target, even of the same model).", default="auto")
    num_speculative_tokens: int = _help(
        "Most tokens drafted per sequence and step. Each sequence's draft length adapts "
        "within 1..k: it starts at min(k, 4), doubles while drafts are accepted whole and drops to "
        "one past the accepted tokens after a miss.", default=8)
    speculative_max_seqs: int = _help(
        "Speculate only while at most this many sequences run: on a CPU a large batch is "
        "compute-bound and verifying drafts costs more than it saves.", default=4)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.max_waiting < 1:
            raise ValueError("max_waiting must be >= 1")
        if self.speculative_method not in (None, "ngram", "draft"):
            raise ValueError(f"speculative_method must be ngram, draft or unset, got "
                             f"{self.speculative_method!r}")
        if (self.speculative_method == "draft") != (self.speculative_model is not None):
            raise ValueError("--speculative-method draft and --speculative-model go together")
        if self.speculative_quantization not in QUANTIZATIONS:
            raise ValueError(f"speculative_quantization must be one of {QUANTIZATIONS}, "
                             f"got {self.speculative_quantization!r}")
        if self.speculative_max_seqs < 1:
            raise ValueError("speculative_max_seqs must be >= 1")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError("num_speculative_tokens must be in [1, 16]")
        if not self.default_ttft_slo_s > 0:
            raise ValueError("default_ttft_slo_s must be > 0")
        if not 0 <= self.slo_step_fraction <= 1:
            raise ValueError(f"slo_step_fraction must be in [0, 1], got {self.slo_step_fraction}")


@dataclass(frozen=True)
class TierConfig:
    """KV tiers below the device: host DRAM (hot) and local disk (large)."""

    SECTION: ClassVar[str] = "tiers"

    host_bytes: int = _help("Host DRAM tier size in bytes (0: off).", default=0)
    disk_path: str | None = _help("Directory of the disk tier (unset: off).", default=None)
    disk_bytes: int = _help("Disk tier size in bytes.", default=16 * 1024**3)
    host_policy: str = _help("Host eviction policy: lru, s3fifo or cost.", default="lru")
    disk_policy: str = _help("Disk eviction policy: lru, s3fifo or cost.", default="lru")
    write_through: bool = _help("Copy blocks down as soon as computed (default: on eviction).",
                                default=False)
    io_threads: int = _help("Disk I/O worker threads.", default=4)
    fsync: bool = _help("fsync each disk block (survives power loss; slower).", default=False)

    def __post_init__(self) -> None:
        if self.host_bytes < 0 or self.disk_bytes < 0:
            raise ValueError("tier sizes must be >= 0")
        if self.disk_path and self.host_bytes == 0:
            raise ValueError("the disk tier needs a host tier: set host_bytes > 0")
        if self.io_threads < 1:
            raise ValueError("io_threads must be >= 1")

    @property
    def is_enabled(self) -> bool:
        return self.host_bytes > 0


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    tiers: TierConfig = field(default_factory=TierConfig)


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP front end."""

    SECTION: ClassVar[str] = "server"

    host: str = _help("Address to listen on.", default="127.0.0.1")
    port: int = _help("TCP port to listen on.", default=8000)
    api_keys: tuple[str, ...] = _help(
        "Accepted API keys, as KEY or KEY:TENANT (comma-separated). None: no auth.", default=()
    )
    tenants: str | None = _help(
        "Tenants file (YAML): API keys, priority class, TTFT/TPOT SLOs, rate limits and "
        "cache salt per tenant; the router reads the same file. See docs/router.md.",
        default=None)
    kv_events_port: int | None = _help(
        "Publish KV block events (stored/removed, per tier) on this ZeroMQ PUB port, for "
        "the router's `kv` policy (unset: off).", default=None)
    p2p_port: int | None = _help(
        "Join the KV mesh: listen for peers on this TCP port and fetch KV blocks from them "
        "(unset: off). Needs --cluster-secret-file; docs/mesh.md.", default=None)
    peers: tuple[str, ...] = _help(
        "Mesh seed peers, HOST:P2P_PORT, comma-separated (any subset of the mesh).",
        default=())
    cluster_secret_file: str | None = _help(
        "File holding the mesh's shared secret (at least 16 bytes).", default=None)
    p2p_advertise_host: str | None = _help(
        "Address peers dial to reach this instance (default: --host).", default=None)
    p2p_socket_buffer_bytes: int = _help(
        "Kernel send and receive buffer of each mesh connection (SO_SNDBUF/SO_RCVBUF, "
        "capped by net.core.wmem_max/rmem_max). Large: a block leaves without a user-space "
        "copy; small: less data in flight when a peer stalls.", default=4 << 20)
    served_model_name: str | None = _help(
        "Model name clients use (default: the model's name).", default=None
    )
    retry_after_s: int = _help("Retry-After seconds sent with a 429.", default=1)
    result_cache_bytes: int = _help(
        "Bound of the result cache: finished answers to deterministic requests (temperature "
        "0 or a seed), replayed for an identical repeat (0: off). A request opts out with "
        '"result_cache": false.', default=0)
    graceful_shutdown_s: float = _help(
        "Seconds to drain in-flight requests on SIGTERM.", default=30.0
    )
    log_level: str = _help("Log level: debug, info, warning, error.", default="info")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if isinstance(self.api_keys, str):
            object.__setattr__(self, "api_keys", tuple(k for k in self.api_keys.split(",") if k))
        if isinstance(self.peers, str):
            object.__setattr__(self, "peers", tuple(p for p in self.peers.split(",") if p))
        if self.p2p_port is not None:
            if not 0 < self.p2p_port <= 65535:
                raise ValueError(f"p2p_port must be in [1, 65535], got {self.p2p_port}")
            if not self.cluster_secret_file:
                raise ValueError("the mesh (--p2p-port) needs --cluster-secret-file")
        if self.result_cache_bytes < 0:
            raise ValueError(f"result_cache_bytes must be >= 0, got {self.result_cache_bytes}")
        if not 4096 <= self.p2p_socket_buffer_bytes <= 1 << 30:
            raise ValueError("p2p_socket_buffer_bytes must be in [4096, 1 GiB], got "
                             f"{self.p2p_socket_buffer_bytes}")


ENGINE_CLASSES: tuple[type[Any], ...] = (ModelConfig, CacheConfig, SchedulerConfig, TierConfig)


def engine_config_from_kwargs(model: str = DEFAULT_MODEL, **kwargs: Any) -> EngineConfig:
    """An EngineConfig from `LLM(...)`-style keywords: fields of ModelConfig, CacheConfig,
    SchedulerConfig and TierConfig, bare or as section_field. TypeError for an unknown
    keyword, ValueError for an invalid value."""
    try:
        groups = split_by_section(ENGINE_CLASSES, {"model": model, **kwargs}, first_owner_wins=True)
    except UnknownConfigKeys as exc:
        raise TypeError(f"unexpected keyword argument {exc.keys[0]!r}: {exc}") from None
    return EngineConfig(
        ModelConfig(**groups[0]),
        CacheConfig(**groups[1]),
        SchedulerConfig(**groups[2]),
        TierConfig(**groups[3]),
    )
