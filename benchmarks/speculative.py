"""Speculative decoding (prompt lookup or a draft model) against plain decoding, in one run.

The default model as `make serve` runs it (or as --dtype/--quantization say), once plain and
once with `--speculative-method ngram` (or `draft`), one stream, greedy, `--tokens` output
tokens per request:

- copy-heavy: repeat or edit a given text, and complete code that repeats a pattern;
- chat: ordinary questions, where drafts are seldom right (speculation backs off).

Rounds alternate plain and speculative; each round runs every prompt of a workload once.
decode tok/s = output tokens after the first / time from the first token to the last (the
prefill left out: it is the same on both sides); end-to-end tok/s (all tokens over all
time, prefill included) is reported beside it. Figures are medians over rounds, with the
spread; the speculative side's acceptance rate and tokens per verifying step come from its
own counters, and `greedy_identical` counts the prompts whose output equals the plain one.
`per_prompt` has each prompt's median decode tok/s on both sides and its output length,
to show which prompts the workload's speedup comes from.

    python benchmarks/speculative.py [--tokens 128] [--rounds 3] [--repeats 1] [--k 8]
        [--dtype auto] [--quantization auto] [--method ngram|draft] [--draft-model M]
        [--draft-quantization int4]

Writes speculative.json (speculative_<dtype>.json for a --dtype other than auto; a
`_draft` suffix with --method draft), and the same document with the CPU kind appended
(e.g. speculative_avx512_bf16_amx.json), so each kind's latest figures stay side by
side; a run with KVMESH_CPU_ISA forced lower or KVMESH_AMX=0 writes only the latter
(e.g. speculative_avx2_on_avx512_bf16_amx.json). The draft-model run that the README
quotes is the exact float32 path drafting with an int4 copy of its own model:

    python benchmarks/speculative.py --method draft --dtype float32 --quantization none --k 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_kind, save_by_cpu  # noqa: E402

from kvmesh.config import SchedulerConfig  # noqa: E402

TEXTS = [
    "The committee met on Tuesday to review the budget. The budget includes funding for "
    "roads, schools and parks. The committee agreed that the funding for roads, schools and "
    "parks should increase next year, and asked the mayor to publish the budget online.",
    "Our office will be closed on Monday for the holiday. During the closure, urgent "
    "requests can be sent to the support team by email. Regular hours resume on Tuesday at "
    "nine in the morning, and all pending orders will ship on Wednesday.",
    "To install the tool, download the archive, unpack it into a folder, and run the setup "
    "script. The setup script checks your system, installs the libraries it needs, and "
    "creates a shortcut on your desktop. Restart your computer when it finishes.",
]
CODE = [
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
    "def mul(a, b):\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
    "    def __repr__(self):\n        return f\"Point(x={self.x}, y={self.y})\"\n\n\n"
    "class Size:\n    def __init__(self, width, height):\n",
    "config = {\n    \"host\": \"localhost\",\n    \"port\": 8080,\n    \"debug\": False,\n}\n"
    "staging = {\n    \"host\": \"staging.example.com\",\n",
]
CHAT = ["What is the capital of France?", "Write a haiku about snow.",
        "Give three tips for better sleep.", "Why is the sky blue?",
        "Explain what a database index is.", "Tell me a fun fact about octopuses."]


def _chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


WORKLOADS = {
    "copy_heavy": [_chat(f"Repeat this text exactly:\n{t}") for t in TEXTS]
    + [_chat(f"Fix the spelling and return the whole text:\n{t.replace('the', 'teh')}")
       for t in TEXTS[:2]]
    + [_chat(f"Continue this code:\n{c}") for c in CODE],
    "chat": [_chat(q) for q in CHAT],
}


def run(llm, prompts: list[str], tokens: int
        ) -> tuple[float, float, list[list[int]], list[float]]:
    """One stream: each prompt alone, driven step by step. Returns decode tok/s (tokens
    after the first / time from the first token to the last: prefill left out), end-to-end
    tok/s (all tokens / all time), the token ids and each prompt's own decode tok/s."""
    from kvmesh import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=tokens)
    decode_tokens, decode_s, made, total_s, outs, each = 0, 0.0, 0, 0.0, [], []
    for prompt in prompts:
        start = time.perf_counter()
        rid = engine.add_request(None, prompt, params)
        ids: list[int] = []
        first = None
        while True:
            deltas = [d for d in engine.step() if d.request_id == rid]
            now = time.perf_counter()
            for d in deltas:
                if d.error:
                    raise RuntimeError(d.error)
                if d.new_token_ids and first is None:
                    first = now
                ids.extend(d.new_token_ids)
            if any(d.finished for d in deltas):
                break
        total_s += now - start
        made += len(ids)
        if first is not None and len(ids) > 1:
            decode_tokens += len(ids) - 1
            decode_s += now - first
        each.append((len(ids) - 1) / (now - first) if first is not None and now > first
                    else 0.0)
        outs.append(ids)
    return decode_tokens / decode_s, made / total_s, outs, each


def measure(plain, spec, prompts: list[str], args: argparse.Namespace) -> dict:
    """Alternating rounds of one workload on both engines: the figures for it."""
    before = spec.engine.core.speculator.counts()
    rates: dict[str, list[float]] = {"plain": [], "spec": [], "plain_e2e": [], "spec_e2e": []}
    same = len(prompts)  # the fewest identical outputs in any round
    each: dict[str, list[list[float]]] = {"plain": [], "spec": []}
    lengths: list[int] = []
    for _ in range(args.rounds):
        rate_p, e2e_p, outs_p, each_p = run(plain, prompts, args.tokens)
        rate_s, e2e_s, outs_s, each_s = run(spec, prompts, args.tokens)
        each["plain"].append(each_p)
        each["spec"].append(each_s)
        lengths = [len(o) for o in outs_s]
        for key, value in (("plain", rate_p), ("spec", rate_s), ("plain_e2e", e2e_p),
                           ("spec_e2e", e2e_s)):
            rates[key].append(value)
        same = min(same, sum(a == b for a, b in zip(outs_p, outs_s, strict=True)))
    counts = spec.engine.core.speculator.counts() - before
    p, s = statistics.median(rates["plain"]), statistics.median(rates["spec"])
    return {
        "decode_tok_per_s_plain": p, "decode_tok_per_s_spec": s, "speedup": s / p,
        "plain_spread": [min(rates["plain"]), max(rates["plain"])],
        "spec_spread": [min(rates["spec"]), max(rates["spec"])],
        "e2e_tok_per_s_plain": statistics.median(rates["plain_e2e"]),
        "e2e_tok_per_s_spec": statistics.median(rates["spec_e2e"]),
        "acceptance_rate": counts.acceptance_rate,
        "tokens_per_verify_step": counts.tokens_per_step,
        "greedy_identical": f"{same}/{len(prompts)}",
        "per_prompt": _per_prompt(prompts, each, lengths)}


def _per_prompt(prompts: list[str], each: dict[str, list[list[float]]],
                lengths: list[int]) -> list[dict]:
    """Each prompt's median decode tok/s on both sides and its output length: which
    prompts the aggregate's speedup comes from."""
    out = []
    for i, prompt in enumerate(prompts):
        p = statistics.median(r[i] for r in each["plain"])
        s = statistics.median(r[i] for r in each["spec"])
        text = prompt.split("\n", 2)[1] if prompt.count("\n") >= 2 else prompt
        out.append({"prompt": text[:48], "output_tokens": lengths[i],
                    "decode_tok_per_s_plain": p, "decode_tok_per_s_spec": s,
                    "speedup": s / p if p else None})
    return out


def _workloads(plain, spec, args: argparse.Namespace) -> dict:
    figures: dict = {}
    for name, prompts in WORKLOADS.items():
        figures[name] = measure(plain, spec, prompts, args)
        print(name, {k: round(v, 3) if isinstance(v, float) else v
                     for k, v in figures[name].items() if k != "per_prompt"})
        for row in figures[name]["per_prompt"]:
            print(f"  {row['prompt']!r:52} {row['output_tokens']:4} tokens "
                  f"{row['decode_tok_per_s_plain']:6.1f} -> {row['decode_tok_per_s_spec']:6.1f}"
                  f" ({row['speedup'] or 0:.2f}x)")
    return figures


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1,
                    help="measure everything this many times (each repeat's figures kept)")
    ap.add_argument("--k", type=int, default=SchedulerConfig.num_speculative_tokens,
                    help="--num-speculative-tokens")
    ap.add_argument("--dtype", default="auto", help="as kvmesh serve --dtype")
    ap.add_argument("--quantization", default="auto", help="the target's, as --quantization")
    ap.add_argument("--method", choices=("ngram", "draft"), default="ngram")
    ap.add_argument("--draft-model", default="smollm2-135m-instruct",
                    help="--speculative-model for --method draft")
    ap.add_argument("--draft-quantization", default="int4",
                    help="--speculative-quantization for --method draft")
    args = ap.parse_args()
    if args.tokens < 8 or args.rounds < 1 or args.repeats < 1 or not 1 <= args.k <= 16:
        ap.error("--tokens >= 8, --rounds >= 1, --repeats >= 1, 1 <= --k <= 16")
    return args


def main() -> None:
    args = _args()
    from kvmesh import LLM

    target = dict(dtype=args.dtype, quantization=args.quantization)
    draft = (dict(speculative_model=args.draft_model,
                  speculative_quantization=args.draft_quantization)
             if args.method == "draft" else {})
    plain = LLM(**target)
    spec = LLM(**target, speculative_method=args.method, num_speculative_tokens=args.k, **draft)
    for llm in (plain, spec):
        llm.generate(["warm up"], None)
    repeats = []
    for _ in range(args.repeats):
        figures = _workloads(plain, spec, args)
        repeats.append({w: {k: figures[w][k] for k in ("decode_tok_per_s_plain",
                                                        "decode_tok_per_s_spec", "speedup")}
                        for w in WORKLOADS})
    figures["speedup_copy_heavy"] = figures["copy_heavy"]["speedup"]
    figures["speedup_chat"] = figures["chat"]["speedup"]
    figures["acceptance_rate"] = spec.engine.core.speculator.acceptance_rate
    if args.repeats > 1:  # every repeat's figures; the workloads' details are the last one's
        figures["repeats"] = repeats
        for w in WORKLOADS:
            figures[f"speedup_{w}_median"] = statistics.median(r[w]["speedup"] for r in repeats)
    config = {"model": "smollm2-135m-instruct", "tokens": args.tokens, "rounds": args.rounds,
              "repeats": args.repeats,
              "num_speculative_tokens": args.k, "streams": 1, "method": args.method,
              "dtype": str(spec.engine.loaded.dtype).replace("torch.", ""),
              "quantization": spec.engine.loaded.quantization, **draft}
    notes = {"greedy_identical": "outside float32 (bf16 here) a verify step's rows can "
                                 "round differently from plain decode steps; float32 "
                                 "identity is a test (tests/engine/test_speculative.py)"}
    name = "speculative" + ("" if args.dtype == "auto" else f"_{args.dtype}")
    name += "_draft" if args.method == "draft" else ""
    config["cpu"] = cpu_kind()
    print(*save_by_cpu(name, config, figures, notes), sep="\n")



if __name__ == "__main__":
    main()
