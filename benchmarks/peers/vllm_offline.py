"""Runs inside vLLM's own venv (.peers/vllm): decode throughput at fixed concurrencies.

Usage: python vllm_offline.py MODEL_DIR 1,16,64 PROMPT_LEN OUTPUT_LEN [REPEATS]
Prints one JSON line: the best of REPEATS runs per concurrency, and every run.
vLLM spawns processes, hence the __main__ guard.
"""

import json
import random
import sys
import time


def main() -> None:
    model_dir, concs, prompt_len, output_len = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(
        sys.argv[4])
    repeats = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    t0 = time.perf_counter()
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model_dir, dtype="bfloat16", max_model_len=4096, enable_prefix_caching=False)
    startup = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    rng = random.Random(0)
    out = {"startup_s": startup, "torch_threads": torch.get_num_threads(), "decode_tok_per_s": {},
           "runs": {}}
    for conc in [int(c) for c in concs.split(",")]:
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(100, 40000)
                                                  for _ in range(prompt_len)])
                   for _ in range(conc)]
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            res = llm.generate(prompts, params, use_tqdm=False)
            dt = time.perf_counter() - start
            runs.append(sum(len(r.outputs[0].token_ids) for r in res) / dt)
        out["runs"][str(conc)] = runs
        out["decode_tok_per_s"][str(conc)] = max(runs)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
