"""Convert a GGUF file into a Hugging Face directory (config, safetensors, tokenizer).

Weights are read and dequantized with the `gguf` package; llama.cpp's q/k row permutation
(done for its RoPE layout on Llama-arch files) is undone. The tokenizer is built once by
transformers from the GGUF metadata and saved as tokenizer.json.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file
from tqdm import tqdm

from kvmesh.model.arch import UnsupportedModelError

GGUF_ARCHS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def hf_name(gguf_name: str) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    if base in TOP_NAMES:
        return f"{TOP_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{suffix}"
    return None


def unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Invert llama.cpp's q/k permutation (interleaved RoPE -> rotate-half layout)."""
    rows = w.shape[0]
    shape = (num_heads, rows // num_heads // 2, 2, *w.shape[1:])
    return w.reshape(shape).swapaxes(1, 2).reshape(w.shape)


def gguf_config(reader: GGUFReader) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported")
    g = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise UnsupportedModelError(
            "GGUF rope_freqs (llama3 RoPE scaling) is not supported; "
            "load the Hugging Face directory instead"
        )
    return {
        "architectures": [GGUF_ARCHS[arch]],
        "model_type": arch if arch != "mistral" else "llama",
        "vocab_size": int(g("vocab_size", len(tokens.data))),
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g("attention.head_count_kv", heads)),
        "head_dim": int(g("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(g("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }


def read_weights(
    reader: GGUFReader, config: dict[str, Any], progress: bool
) -> dict[str, torch.Tensor]:
    permute = config["model_type"] == "llama"
    out: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc="dequantizing", disable=not progress, unit="tensor"):
        name = hf_name(t.name)
        if name is None:
            continue
        data = np.asarray(t.data)
        if t.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            data = dequantize(data, t.tensor_type)
        w = data.astype(np.float32).reshape(tuple(reversed([int(x) for x in t.shape])))
        if permute and name.endswith("q_proj.weight"):
            w = unpermute(w, config["num_attention_heads"])
        elif permute and name.endswith("k_proj.weight"):
            w = unpermute(w, config["num_key_value_heads"])
        out[name] = torch.from_numpy(np.ascontiguousarray(w))
    return out


def save_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "building a tokenizer from GGUF needs transformers (pip install 'kvmesh[convert]')"
        ) from exc
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out_dir))


def convert_gguf(gguf_path: Path, out_dir: Path, progress: bool = True) -> Path:
    """Write a complete HF directory at `out_dir`, atomically (temp dir, then rename)."""
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    reader = GGUFReader(str(gguf_path))
    config = gguf_config(reader)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    try:
        save_file(read_weights(reader, config, progress), str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        save_tokenizer(gguf_path, tmp)
        (tmp / "SOURCE").write_text(f"{gguf_path.resolve()}\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.chmod(0o755)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
