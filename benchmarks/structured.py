"""Structured output: the grammar library's cost per token, and decode speed with and without
constraints, on the default model.

1. Mask cost. For 5 JSON schemas (nested objects, arrays, enums, a pattern), a valid
   instance is tokenized with the default model's tokenizer and walked token by token:
   the time to compute each next-token mask, and to compile each schema fresh. llguidance
   (what kvmesh uses) always; xgrammar too where it is installed (`pip install xgrammar`),
   for the comparison behind the choice (src/kvmesh/engine/structured.py). Repeated.
2. Decode speed. The engine as `make serve` runs it (auto dtype and quantization) decodes
   `--tokens` tokens for 1 and 16 concurrent requests, free (ignore_eos) and under a JSON
   schema that cannot close before the budget (an array of at least 64 strings, without
   and with a maxLength), so every side produces the same number of tokens. Rounds
   alternate free and constrained; figures are medians with the spread.

    python benchmarks/structured.py [--tokens 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

CASES = [
    ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
      "required": ["name", "age"]}, {"name": "Bob", "age": 7}),
    ({"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"sku": {"type": "string"},
                                         "qty": {"type": "integer", "minimum": 1}},
        "required": ["sku", "qty"]}}}, "required": ["items"]},
     {"items": [{"sku": "A-1", "qty": 2}, {"sku": "B-22", "qty": 10}]}),
    ({"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                       "ok": {"type": "boolean"}},
      "required": ["color", "ok"]}, {"color": "green", "ok": True}),
    ({"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 40}, "year": {"type": "integer"},
        "authors": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "meta": {"type": "object", "properties": {"pages": {"type": "number"},
                                                  "isbn": {"type": "string"}},
                 "required": ["pages"]}}, "required": ["title", "year", "authors", "meta"]},
     {"title": "A walk in the woods", "year": 1998, "authors": ["Bill Bryson"],
      "meta": {"pages": 397.5, "isbn": "0-7679-0251-3"}}),
    ({"type": "object", "properties": {
        "event": {"type": "string"},
        "when": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        "attendees": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "role": {"enum": ["host", "guest"]}},
            "required": ["name", "role"]}}}, "required": ["event", "when", "attendees"]},
     {"event": "Team sync", "when": "2026-12-04",
      "attendees": [{"name": "Ana", "role": "host"}, {"name": "Raj", "role": "guest"}]}),
]
LONG = {  # strings: llguidance's slicer makes their masks cheap
    "unbounded": {"type": "object", "properties": {"log": {
        "type": "array", "minItems": 64, "items": {"type": "string"}}}, "required": ["log"]},
    # maxLength strings: no slice applies, each mask walks the token trie
    "bounded": {"type": "object", "properties": {"log": {
        "type": "array", "minItems": 64, "items": {"type": "string", "maxLength": 24}}},
        "required": ["log"]},
}
QUESTIONS = ["Log what you did today.", "List some animals.", "Name cities you know.",
             "Write down a shopping list.", "Record the steps of a recipe.",
             "List programming languages.", "Note the planets.", "List colours."]


class _Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer_json: str, vocab: int, eos: int):
        import llguidance
        import numpy as np

        from kvmesh.engine.structured import JSON_LAYOUT

        self.llg, self.layout = llguidance, JSON_LAYOUT
        self.tok = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=eos)
        self.buf = np.zeros((vocab + 31) // 32, dtype=np.int32)

    def compile(self, schema):
        g = self.llg.LLMatcher.grammar_from_json_schema(schema)  # flexible: any layout
        return self.llg.LLMatcher(self.tok, g)

    def mask(self, m) -> None:
        m.unsafe_compute_mask_ptr(self.buf.ctypes.data, self.buf.nbytes)

    def consume(self, m, t: int) -> None:
        if not m.consume_token(t):
            raise RuntimeError(m.get_error())


class _Xgrammar:
    name = "xgrammar"

    def __init__(self, model_dir: Path, vocab: int, eos: int):
        import xgrammar
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
        self.x = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab,
                                                             stop_token_ids=[eos])
        self.buf = xgrammar.allocate_token_bitmask(1, vocab)

    def compile(self, schema):
        compiler = self.x.GrammarCompiler(self.info, cache_enabled=False)
        return self.x.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema)))

    def mask(self, m) -> None:
        m.fill_next_token_bitmask(self.buf)

    def consume(self, m, t: int) -> None:
        if not m.accept_token(t):
            raise RuntimeError(f"token {t} refused")


def mask_cost(lib, tokenize, eos: int, rounds: int) -> dict:
    per_round = []
    for _ in range(rounds):
        masks, compiles = [], []
        for schema, instance in CASES:
            ids = tokenize(json.dumps(instance)) + [eos]
            start = time.perf_counter()
            m = lib.compile(schema)
            compiles.append(time.perf_counter() - start)
            for t in ids:
                start = time.perf_counter()
                lib.mask(m)
                masks.append(time.perf_counter() - start)
                lib.consume(m, t)
        masks.sort()
        per_round.append({"mask_mean_us": statistics.mean(masks) * 1e6,
                          "mask_p50_us": masks[len(masks) // 2] * 1e6,
                          "mask_p99_us": masks[int(len(masks) * 0.99)] * 1e6,
                          "compile_ms": statistics.mean(compiles) * 1e3,
                          "tokens": len(masks)})
    out = {k: statistics.median(r[k] for r in per_round) for k in per_round[0]}
    out["mask_mean_us_spread"] = [min(r["mask_mean_us"] for r in per_round),
                                  max(r["mask_mean_us"] for r in per_round)]
    return out


def decode_rate(llm, concurrency: int, tokens: int, schema: dict | None) -> float:
    from kvmesh import SamplingParams
    from kvmesh.types import StructuredOutput

    chat = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    prompts = [chat.format(QUESTIONS[i % len(QUESTIONS)]) for i in range(concurrency)]
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=schema is None,
                            structured=StructuredOutput("json_schema", json.dumps(schema))
                            if schema is not None else None)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    made = sum(len(o.token_ids) for o in outs)
    if made != tokens * concurrency:
        raise RuntimeError(f"expected {tokens * concurrency} tokens, got {made}")
    return made / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.tokens < 16 or args.rounds < 1:
        ap.error("--tokens must be >= 16 and --rounds >= 1")

    from kvmesh import LLM

    llm = LLM()
    tok = llm.engine.tokenizer
    vocab = llm.engine.inputs.vocab_size
    eos = tok.eos_token_id
    figures: dict = {}
    notes: dict = {}

    def tokenize(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    libs = [_Llguidance(tok.to_json(), vocab, eos)]
    try:
        libs.append(_Xgrammar(llm.engine.loaded.path, vocab, eos))
    except ImportError as exc:
        notes["xgrammar"] = f"not installed ({exc}); its figures are null"
        figures["xgrammar"] = None
    for lib in libs:
        figures[lib.name] = mask_cost(lib, tokenize, eos, max(3, args.rounds))
        print(lib.name, {k: round(v, 2) if isinstance(v, float) else v
                         for k, v in figures[lib.name].items()})

    llm.generate(["warm up"], None)
    kinds = {"free": None, **LONG}
    for conc in (1, 16):
        rates: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(args.rounds):
            for kind, schema in kinds.items():
                rates[kind].append(decode_rate(llm, conc, args.tokens, schema))
        med = {k: statistics.median(v) for k, v in rates.items()}
        row: dict = {"decode_tok_per_s_free": med["free"],
                     "free_spread": [min(rates["free"]), max(rates["free"])]}
        for kind in LONG:
            row[f"decode_tok_per_s_{kind}"] = med[kind]
            row[f"{kind}_over_free_ratio"] = med[kind] / med["free"]
            row[f"{kind}_spread"] = [min(rates[kind]), max(rates[kind])]
        figures[f"c{conc}"] = row
        print(f"c={conc}: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in med.items()))
    config = {"model": "smollm2-135m-instruct", "tokens": args.tokens, "rounds": args.rounds,
              "dtype": str(llm.engine.loaded.dtype).replace("torch.", ""),
              "quantization": llm.engine.loaded.quantization, "schema_decode": LONG}
    notes["decode"] = ("output tokens / wall time of one generate() call per round, free "
                       "and constrained alternating; the prompt is short (~20 tokens)")
    print(save("structured", config, figures, notes))


if __name__ == "__main__":
    main()
