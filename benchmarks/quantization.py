"""Quality of each weight-quantization profile against float32 greedy, on the default model.

For each of 20 chat prompts, float32 (`quantization none`) greedy-decodes 64 tokens: the
reference. Each profile is then scored teacher-forced, through the real engine: for every
position i it is given the prompt plus the reference's first i tokens and asked for one
token with top-20 logprobs (prefix caching makes each position a one-block recompute).
Figures per profile:

- top1_agreement: the share of the 20 x 64 positions where its argmax is the reference
  token;
- mean_abs_logprob_gap: the mean |logprob(reference token)| difference to float32 (where
  the token falls outside a profile's top 20, the 20th logprob bounds it; counted);
- greedy_identical_prefix_mean: free running, how many leading tokens equal the reference.

`none` is scored the same way as a control: it must agree 100%. `PROFILE@int8` scores a
profile with int8 inputs to its int4 layers (`--quant-activations int8`, llama.cpp's Q4 x
Q8; "applied" then reads int4a8x...). Where the CPU has native
bf16, bfloat16 profiles (the default there is bfloat16:auto) are scored against the same
float32 reference; teacher-forced positions run as prefills, free running covers the
decode path (fused layers included).
Writes benchmarks/results/quantization.json, and the same document as
quantization_<isa>.json (the CPU's native level), so each kind of CPU's figures stay.

    python benchmarks/quantization.py [--profiles none,auto,int8,int4,auto@int8] [--tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

PROMPTS = [
    "What is the capital of France?", "Explain photosynthesis to a child.",
    "Write a haiku about the sea.", "Give three tips for learning a language.",
    "What causes rain?", "Write a Python function that reverses a string.",
    "Summarise the plot of Romeo and Juliet.", "How do vaccines work?",
    "List the planets of the solar system.", "What is a prime number?",
    "Describe a cat to someone who has never seen one.", "Why is the sky blue?",
    "Write a short email asking for a meeting.", "What is machine learning?",
    "How do I make a cup of tea?", "Translate 'good morning' into Spanish and French.",
    "What are the benefits of exercise?", "Explain what a database index is.",
    "Tell me a fun fact about octopuses.", "What is the difference between weather and "
    "climate?",
]


def reference(llm, prompts: list[list[int]], tokens: int):
    from kvmesh import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, logprobs=0)
    outs = llm.generate(prompts, params)
    return [(o.token_ids, [lp[t] for lp, t in zip(o.outputs[0].logprobs, o.token_ids,
                                                   strict=True)]) for o in outs]


def score(llm, prompts: list[list[int]], refs, tokens: int) -> dict:
    """Teacher-forced agreement and logprob gap against `refs`."""
    from kvmesh import SamplingParams

    one = SamplingParams(temperature=0.0, max_tokens=1, logprobs=20)
    agree, gaps, outside = 0, [], 0
    for prompt, (ref, ref_lp) in zip(prompts, refs, strict=True):
        llm.generate([prompt + ref], SamplingParams(temperature=0.0, max_tokens=1))  # warm
        outs = llm.generate([prompt + ref[:i] for i in range(tokens)], one)
        for i, out in enumerate(outs):
            top = out.outputs[0].logprobs[0]
            agree += out.token_ids[0] == ref[i]
            if ref[i] not in top:
                outside += 1
            gaps.append(abs(top.get(ref[i], min(top.values())) - ref_lp[i]))
    return {"top1_agreement": agree / (len(prompts) * tokens),
            "mean_abs_logprob_gap": statistics.fmean(gaps),
            "max_abs_logprob_gap": max(gaps), "positions_outside_top20": outside}


def free_running(llm, prompts, refs, tokens: int) -> float:
    from kvmesh import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=tokens,
                                                ignore_eos=True))
    same = []
    for out, (ref, _) in zip(outs, refs, strict=True):
        pairs = zip(out.token_ids, ref, strict=False)
        n = next((i for i, (a, b) in enumerate(pairs) if a != b), tokens)
        same.append(n)
    return statistics.fmean(same)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profiles", default=None,
                    help="comma-separated; a profile is [DTYPE:]QUANT[@INPUTS] (default: none,"
                         "auto,int8,int4, plus auto@int8 where int8 inputs run, and "
                         "bfloat16:none,bfloat16:auto where the CPU has native bf16, whose "
                         "default that is)")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    from kvmesh import LLM
    from kvmesh.model import cpu_isa
    from kvmesh.model.quant import int8_activations_available, linear_weight_bytes

    native = cpu_isa.has_fast_bf16_native()
    profiles = (args.profiles or "none,auto,int8,int4" + (
        ",auto@int8" if int8_activations_available() else "")
        + (",bfloat16:none,bfloat16:auto" if native else "")).split(",")
    base = LLM(dtype="float32", quantization="none", max_num_seqs=64)
    tok = base.get_tokenizer()
    prompts = [tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    refs = reference(base, prompts, args.tokens)
    del base
    results: dict = {}
    for profile in profiles:
        start = time.perf_counter()
        dtype, _, quant = profile.rpartition(":")
        quant, _, inputs = quant.partition("@")
        llm = LLM(dtype=dtype or "float32", quantization=quant, max_num_seqs=64,
                  quant_activations=inputs or "float32")
        applied = llm.engine.loaded.quantization
        weight_bytes = linear_weight_bytes(llm.engine.loaded.model)
        res = score(llm, prompts, refs, args.tokens)
        res["greedy_identical_prefix_mean"] = free_running(llm, prompts, refs, args.tokens)
        res.update(applied=applied, weight_bytes_read_per_token=weight_bytes,
                   wall_s=time.perf_counter() - start)
        results[profile.replace(":", "_").replace("@", "_in_")] = res
        print(profile, {k: round(v, 4) if isinstance(v, float) else v
                        for k, v in res.items()}, flush=True)
        del llm
    figures = {
        "profiles": results,
        **{f"top1_agreement_{p}": r["top1_agreement"] for p, r in results.items()},
        **{f"mean_abs_logprob_gap_{p}": r["mean_abs_logprob_gap"] for p, r in results.items()},
        **cpu_isa.describe(),
    }
    notes = {"method": "teacher-forced against float32 greedy (quantization none); "
                       f"{len(PROMPTS)} chat prompts x {args.tokens} positions; top-20 logprobs",
             "weight_bytes_read_per_token": "bytes of every linear layer's weights (packed "
                                            "ints and scales for quantized ones), lm_head "
                                            "included, embedding lookups excluded"}
    cfg = {"model": "smollm2-135m-instruct", "dtype": "float32 unless a profile names one",
           "profiles": profiles,
           "tokens": args.tokens, "prompts": len(PROMPTS)}
    print("wrote", save("quantization", cfg, figures, notes))
    print("wrote", save(f"quantization_{figures['cpu_native_isa']}", cfg, figures, notes))


if __name__ == "__main__":
    main()
