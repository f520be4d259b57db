"""Hugging Face transformers reference generation, for token-for-token comparisons."""

from __future__ import annotations

from pathlib import Path

import torch


def hf_greedy(
    model, prompts: list[list[int]], max_new_tokens: int, eos: int | None
) -> list[list[int]]:
    """Greedy continuations, one prompt at a time (no padding), stopping at `eos`."""
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            full = model.generate(
                torch.tensor([ids], device=model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos if eos is not None else 0,
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
            )[0].tolist()
            outs.append(full[len(ids) :])
    return outs


def load_hf(model_dir: Path, gguf_file: str | None = None):
    import transformers

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, **kwargs
    )
    return model.eval()
