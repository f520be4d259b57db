"""Architecture description parsed from a Hugging Face config.json. No torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or options are not supported by kvmesh."""


@dataclass(frozen=True)
class RopeScaling:
    kind: str  # "llama3" or "linear"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArch:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    qk_norm: bool = False
    rope_scaling: RopeScaling | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def _rope_params(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3",
            float(params["factor"]),
            float(params.get("low_freq_factor", 1.0)),
            float(params.get("high_freq_factor", 4.0)),
            int(params.get("original_max_position_embeddings", 8192)),
        )
    if kind == "linear":
        return theta, RopeScaling("linear", float(params["factor"]))
    raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported")


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def parse_arch(cfg: dict[str, Any]) -> ModelArch:
    """Validate and read a config.json dict. Raises UnsupportedModelError."""
    names = cfg.get("architectures") or []
    family = next((SUPPORTED_ARCHITECTURES[n] for n in names if n in SUPPORTED_ARCHITECTURES), None)
    if family is None:
        raise UnsupportedModelError(
            f"architecture {names or cfg.get('model_type')!r} is not supported; "
            f"kvmesh runs {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    window = cfg.get("sliding_window")
    max_pos = int(cfg.get("max_position_embeddings", 4096))
    if window is not None and cfg.get("use_sliding_window", True) and int(window) < max_pos:
        raise UnsupportedModelError(f"sliding-window attention ({window}) is not supported")
    num_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    theta, scaling = _rope_params(cfg)
    return ModelArch(
        family=family,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or hidden // num_heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
        qk_norm=family == "qwen3",
        rope_scaling=scaling,
        eos_token_ids=_as_ids(cfg.get("eos_token_id")),
        bos_token_id=cfg.get("bos_token_id"),
    )
