"""The cost of a verify step of speculative decoding by its rows, against a plain decode step,
with the AMX paths for few rows on and off in the same run.

`make serve`'s settings (`LLM()`) with prompt lookup, one sequence, greedy. A verify step of
`rows` rows checks rows - 1 drafted tokens; here every step drafts exactly that many (a
fixed drafter: its tokens are mostly rejected, so the context grows a token a step as in
plain decoding) and `rows` 1 is a plain decode step. Per point: the median engine step time
of each round's `--steps` steps after warm-up, the median over `--rounds` rounds, and its
ratio to the plain step of the same variant: what a draft must earn back in accepted
tokens. Variants (rounds interleaved):

- `tiles`: as served: int4 linears on the AMX tiles from 3 rows
  (quant_i4bf16_set_amx_min_rows), a sequence's verify rows attending together on the
  tiles from 2 rows (kernels/paged_verify.c, decode_layer_set_verify_min_rows), the int8
  lm_head's rows above 4 on the tiles (kernels/quant_i8amx.c);
- `linears_from_2`: the int4 linears on the tiles from 2 rows;
- `attention_from_3`: verify rows attending together from 3 rows;
- `attention_per_row`: each verify row's attention on its own (paged_decode.c);
- `head_dense`: the lm_head's rows above 4 on its dense bf16 copy (then exact_near_top).

    python benchmarks/verify_step.py [--rows 1,2,3,5,9] [--context 200] [--rounds 5]
        [--steps 24]

Writes verify_step.json and verify_step_<cpu kind>.json (with `_ctx<N>` before `.json`
for a --context other than 200; a forced ISA level or KVMESH_AMX=0 writes only the
latter). Needs a CPU with AMX for the
variants to differ (elsewhere they are the same path, and it says so).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_kind, save_by_cpu  # noqa: E402

# (int4 linears' tiles from, verify attention from, lm_head on the tiles)
VARIANTS = {"tiles": (3, 2, True), "linears_from_2": (2, 2, True),
            "attention_from_3": (3, 3, True), "attention_per_row": (3, 1 << 20, True),
            "head_dense": (3, 2, False)}
WORDS = ["the", "harbour", "light", "turned", "over", "the", "water", "while", "ships",
         "passed", "in", "the", "night", "and", "the", "keeper", "wrote", "each", "name",
         "in", "his", "book"]


class FixedDrafter:
    """Drafts exactly the most it may: the sequence's last token repeated."""

    def propose(self, wants):
        return [[w.tokens[-1]] * w.max_tokens for w in wants]

    def forget(self, seq_ids):
        pass


def step_ms(llm, rows: int, context: int, steps: int) -> float:
    from kvmesh import SamplingParams

    engine = llm.engine
    spec = engine.core.speculator
    spec._room = lambda req: (rows - 1 if req.num_pending_tokens == 1 else 0, 0)
    prompt = " ".join(WORDS[i % len(WORDS)] for i in range(context))
    rid = engine.add_request(None, prompt, SamplingParams(
        temperature=0.0, max_tokens=(steps + 4) * rows, ignore_eos=True))
    times: list[float] = []
    finished = False
    while not finished and len(times) < steps + 3:
        start = time.perf_counter()
        deltas = engine.step()
        times.append(time.perf_counter() - start)
        finished = any(d.finished and d.request_id == rid for d in deltas)
    if not finished:
        engine.abort_request(rid)
    return 1000 * statistics.median(times[3:])


def _set(lib, head, head_rows: int, variant: tuple[int, int, bool]) -> None:
    amx_min, verify_min, head_tiles = variant
    if lib is not None:
        lib.quant_i4bf16_set_amx_min_rows(amx_min)
        lib.decode_layer_set_verify_min_rows(verify_min)
    if hasattr(head, "amx_rows"):
        head.amx_rows = head_rows if head_tiles else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,3,5,9")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=24)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    from kvmesh import LLM
    from kvmesh.model.cpu_kernels import load

    llm = LLM(speculative_method="ngram", num_speculative_tokens=max(rows) - 1)
    llm.engine.core.speculator.drafter = FixedDrafter()
    lib = load()
    tiles = bool(lib is not None and lib.paged_verify_available())
    runs: dict[str, dict[int, list[float]]] = {v: {r: [] for r in rows} for v in VARIANTS}
    step_ms(llm, 2, args.context, 4)  # warm-up
    head = llm.engine.loaded.model.lm_head
    head_rows = getattr(head, "amx_rows", 0)
    for _ in range(args.rounds):
        for name, variant in VARIANTS.items():
            _set(lib, head, head_rows, variant)
            for r in rows:
                runs[name][r].append(step_ms(llm, r, args.context, args.steps))
    _set(lib, head, head_rows, VARIANTS["tiles"])
    figures: dict = {}
    for name in VARIANTS:
        plain = statistics.median(runs[name][rows[0]])
        figures[name] = {str(r): {"step_ms": statistics.median(v), "spread_ms": [min(v), max(v)],
                                  "vs_plain": statistics.median(v) / plain}
                         for r, v in runs[name].items()}
        print(name, {r: f"{f['step_ms']:.2f} ms ({f['vs_plain']:.2f}x)"
                     for r, f in figures[name].items()})
    config = {"model": "smollm2-135m-instruct", "rows": rows, "context": args.context,
              "rounds": args.rounds, "steps": args.steps, "cpu": cpu_kind(),
              "dtype": str(llm.engine.loaded.dtype).replace("torch.", ""),
              "quantization": llm.engine.loaded.quantization, "amx_tiles": tiles}
    notes = {"variants": "tiles: as served; linears_from_2: int4 linears on the tiles from "
                         "2 rows; attention_from_3: verify rows attend together from 3 rows; "
                         "attention_per_row: paged_decode for every verify row; head_dense: "
                         "the lm_head's rows above 4 on its dense bf16 copy"}
    if not tiles:
        notes["amx"] = "no AMX tiles here: the variants run the same path"
    name = "verify_step" + ("" if args.context == 200 else f"_ctx{args.context}")
    print(*save_by_cpu(name, config, figures, notes), sep="\n")


if __name__ == "__main__":
    main()
