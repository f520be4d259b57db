"""Greedy tokens of the default model from a base commit and a new one (HEAD).

The reference prompts (tests/texts.py `varied_prompts`: about 10 to 2,000 tokens), 48 output
tokens each, default settings (dtype and quantization auto) and the exact float32 path,
without tiers and with host + disk tiers (all prompts at once, then again one at a time,
served by the tiers). Reports whether every sequence is identical, old against new and
tiered against cold (bf16 hits may change tokens: a different batch shape rounds
differently; float32 must not). Writes
benchmarks/results/<--name>.json.

    python benchmarks/ab_tokens.py --base 05f5d67 [--new HEAD] [--name NAME]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from ab_commits import git, run_in_tree, worktrees  # noqa: E402
from common import save  # noqa: E402

RUN = """
import json, sys, tempfile
sys.path[:0] = [{src!r}, {root!r}]
import kvmesh
assert kvmesh.__file__.startswith({src!r}), kvmesh.__file__
from kvmesh import LLM, SamplingParams
from tests.texts import varied_prompts
prompts = varied_prompts()
params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
out = {{}}
for profile, kw in (("default", {{}}), ("float32", {{"dtype": "float32", "quantization": "none"}})):
    llm = LLM(**kw)
    out[profile] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    llm.close()
    with tempfile.TemporaryDirectory() as disk:
        tiered = LLM(num_blocks=160, host_bytes=32 * 2**20, disk_path=disk, **kw)
        res = tiered.generate(prompts, params)  # a burst: the tiers fill
        out[f"{{profile}}_tiers_0"] = [o.outputs[0].token_ids for o in res]
        out[f"{{profile}}_tiers_0_cached"] = sum(o.num_cached_tokens for o in res)
        res = [tiered.generate([p], params)[0] for p in prompts]  # one by one: tier hits
        out[f"{{profile}}_tiers_1"] = [o.outputs[0].token_ids for o in res]
        out[f"{{profile}}_tiers_1_cached"] = sum(o.num_cached_tokens for o in res)
        tiered.close()
print("RESULT " + json.dumps(out), flush=True)
"""


def run_tree(tree: Path) -> dict:
    return run_in_tree(RUN.format(src=str(tree / "src"), root=str(tree)), tree, 3600)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--new", default="HEAD")
    ap.add_argument("--name", default="ab_tokens")
    args = ap.parse_args()
    commits = {"base": git("rev-parse", args.base), "new": git("rev-parse", args.new)}
    with worktrees(commits) as trees:
        old, new = run_tree(trees["base"]), run_tree(trees["new"])
    seqs = {k: v for k, v in new.items() if not k.endswith("_cached")}
    identical = {k: old[k] == v for k, v in seqs.items()}
    figures = {"identical": identical, "all_identical": all(identical.values()),
               "num_sequences": {k: len(v) for k, v in seqs.items()},
               "cached_tokens": {k: [old[k], new[k]] for k in new if k.endswith("_cached")},
               "tiers_match_cold": {p: new[f"{p}_tiers_1"] == new[p]
                                    for p in ("default", "float32")}}
    save(args.name, commits, figures)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
