"""kvmesh: LLM serving built around a reusable, tiered, peer-to-peer KV cache.

`from kvmesh import LLM, SamplingParams` loads lazily, so importing kvmesh stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvmesh.types import CompletionOutput, RequestOutput, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]

if TYPE_CHECKING:
    from kvmesh.llm import LLM


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from kvmesh.llm import LLM

        return LLM
    raise AttributeError(name)
