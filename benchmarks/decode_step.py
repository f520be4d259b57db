"""The default model's decode step by batch rows, with the linears' weight prefetch on and
off in the same run, against the memory floor.

`make serve`'s settings (`LLM()`), greedy, `--rows` sequences decoding together (1 row is a
single stream; 2 to 8 rows are also what a verify step of speculative decoding runs), and
the kernels' software prefetch (kernels/vec_math.h) at its default distance and at 0,
rounds interleaved. Per point: the median step time of each round's `--steps` steps after
warm-up (sampling and scheduling included: what an engine step costs), the best and the
median of `--rounds` rounds, and the step's floor: the weight bytes a step reads over the
memory read bandwidth (a 512 MiB tensor sum), which one row cannot beat.

    python benchmarks/decode_step.py [--rows 1,2,4,8] [--rounds 5] [--steps 24]

Writes decode_step.json and decode_step_<cpu kind>.json (each CPU kind's latest; a
forced ISA level or KVMESH_AMX=0 writes only the latter).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_kind, read_gbps, save_by_cpu  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and the ships that pass"


def step_ms(llm, rows: int, steps: int) -> float:
    """The median time of `steps` decode steps of `rows` sequences (after their prefill
    and 2 steps of warm-up), in milliseconds."""
    from kvmesh import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=steps + 4, ignore_eos=True)
    for i in range(rows):
        engine.add_request(None, f"{PROMPT} ({i}).", params)
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        engine.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    while engine.has_unfinished_requests():
        engine.step()
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=24)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    if args.rounds < 1 or args.steps < 4 or not all(1 <= r <= 64 for r in rows):
        ap.error("--rounds >= 1, --steps >= 4, rows in 1..64")
    from kvmesh import LLM
    from kvmesh.model.cpu_kernels import DEFAULT_PREFETCH, load
    from kvmesh.model.quant import linear_weight_bytes

    lib = load()
    if lib is None:
        print("no native CPU kernels here: nothing to compare")
        return
    llm = LLM()
    before = lib.kernels_set_prefetch(DEFAULT_PREFETCH)  # the default, whatever the env says
    default = DEFAULT_PREFETCH
    step_ms(llm, 1, 4)  # warm-up
    sides = {"prefetch": default, "no_prefetch": 0}
    runs: dict[str, dict[int, list[float]]] = {s: {r: [] for r in rows} for s in sides}
    for _ in range(args.rounds):
        for r in rows:
            for side, dist in sides.items():
                lib.kernels_set_prefetch(dist)
                runs[side][r].append(step_ms(llm, r, args.steps))
    lib.kernels_set_prefetch(before)
    read = max(read_gbps() for _ in range(3))
    weight_bytes = linear_weight_bytes(llm.engine.loaded.model)
    floor_ms = weight_bytes / (read * 1e9) * 1e3
    figures: dict = {"step_ms": {}, "memory_read_gbps": read, "weight_bytes": weight_bytes,
                     "floor_ms": floor_ms, "prefetch_bytes": default}
    for r in rows:
        point = {side: {"median": statistics.median(v[r]), "best": min(v[r]),
                        "spread": [min(v[r]), max(v[r])]} for side, v in runs.items()}
        point["speedup"] = point["no_prefetch"]["median"] / point["prefetch"]["median"]
        point["floor_ratio"] = point["prefetch"]["median"] / floor_ms
        figures["step_ms"][str(r)] = point
        print(f"{r} rows: {point['no_prefetch']['median']:.2f} -> "
              f"{point['prefetch']['median']:.2f} ms ({point['speedup']:.2f}x), "
              f"{point['floor_ratio']:.2f}x the floor of {floor_ms:.2f} ms")
    loaded = llm.engine.loaded
    config = {"model": "smollm2-135m-instruct", "rows": rows, "rounds": args.rounds,
              "steps": args.steps, "dtype": str(loaded.dtype).removeprefix("torch."),
              "quantization": loaded.quantization, "cpu": cpu_kind()}
    notes = {"floor": "weight bytes of the linears and lm_head per step / memory_read_gbps; "
                      "KV reads and the embedding lookup left out"}
    llm.close()
    print(*save_by_cpu("decode_step", config, figures, notes), sep="\n")


if __name__ == "__main__":
    main()
