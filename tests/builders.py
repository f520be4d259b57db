"""Builders for tests: tiny random models (saved by transformers), requests and configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvmesh.engine.request import Request
from kvmesh.hashing import make_namespace
from kvmesh.types import SamplingParams

CORPUS = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins "
    "with a single step. To be or not to be, that is the question. All that glitters is "
    "not gold. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Code: def f(x): return x * 2\n"
)

TINY = {
    "llama": dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "qwen3": dict(
        architectures=["Qwen3ForCausalLM"],
        model_type="qwen3",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=False,
        rope_theta=1000000.0,
    ),
    "qwen2": dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
}


def build_tokenizer(out: Path, vocab_size: int = 512) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS] * 20, trainer)
    tok.save(str(out / "tokenizer.json"))
    template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": template}
    (out / "tokenizer_config.json").write_text(json.dumps(config))



def build_tiny_model(out: Path, family: str, seed: int = 0, **overrides: Any) -> Path:
    """A random-weight model saved by transformers itself, plus a small BPE tokenizer."""
    import torch
    import transformers

    cfg = dict(
        TINY[family],
        **overrides,
        vocab_size=512,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.4,
    )
    cls_name = cfg["architectures"][0]
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config).eval()
    model.save_pretrained(str(out), safe_serialization=True)
    build_tokenizer(out)
    return out


def make_request(
    rid: str,
    num_tokens: int,
    max_tokens: int = 4,
    priority: int = 0,
    arrival: float = 0.0,
    base: int = 0,
) -> Request:
    ids = [(base + i) % 500 + 3 for i in range(num_tokens)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return Request(
        rid,
        ids,
        params,
        make_namespace("test", "float32", "bm"),
        arrival_time=arrival,
        priority=priority,
        eos_token_ids=frozenset({2}),
    )


def build_grid_model(tmp_path: Path, arch: str = "llama", **overrides: Any) -> Path:
    """A tiny model whose weights sit on int4 (linears) and int8 (embeddings) grids, as a
    model converted from a Q4_1/Q8_0 GGUF does: `quantization auto` takes it exactly."""
    from safetensors.torch import load_file, save_file

    from kvmesh.model.quant import GROUP, dequantize, quantize

    model_dir = build_tiny_model(tmp_path, arch, **overrides)
    path = next(model_dir.glob("*.safetensors"))
    tensors = load_file(str(path))
    for name, t in tensors.items():
        if t.dim() == 2 and t.shape[0] % 16 == 0 and t.shape[1] % GROUP == 0:
            bits = 8 if "embed" in name else 4
            tensors[name] = dequantize(quantize(t.float(), bits)).to(t.dtype)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return model_dir
