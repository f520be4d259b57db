"""Same-run A/B of the engine's throughput: a base commit against a new one (HEAD).

Checks out `--base` and `--new` in temporary git worktrees (so edits made while it runs
change nothing), then alternates fresh processes of
`engine_throughput.kvmesh_run` from each tree (A B A B ..., so drift hits both sides),
each at 1, 16 and 64 concurrent (128 + 128 tokens, EOS ignored, best of that run's
repeats) plus 2k-token prefill. Reports, per concurrency, each side's best and every run,
and the ratio new / base of the bests. Writes benchmarks/results/<--name>.json.

    python benchmarks/ab_commits.py --base 05f5d67 [--new HEAD] [--rounds 3] [--name NAME]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import save  # noqa: E402

RUN = """
import json, sys
sys.path[:0] = [{src!r}, {bench!r}]
import kvmesh
assert kvmesh.__file__.startswith({src!r}), kvmesh.__file__
from engine_throughput import kvmesh_run
out = kvmesh_run("auto", {concs!r})
print("RESULT " + json.dumps(out), flush=True)
"""


def run_in_tree(code: str, tree: Path, timeout_s: float = 1800) -> dict:
    """Run `code` in a fresh process in `tree`; it prints one `RESULT <json>` line."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=timeout_s, cwd=tree)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"run in {tree} failed: {r.stderr[-3000:]}")


def run_tree(tree: Path, concs: list[int]) -> dict:
    code = RUN.format(src=str(tree / "src"), bench=str(tree / "benchmarks"), concs=concs)
    return run_in_tree(code, tree)


@contextmanager
def worktrees(commits: dict[str, str]) -> Iterator[dict[str, Path]]:
    """Each commit checked out in a temporary worktree, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="kvmesh-ab-") as tmp:
        trees = {side: Path(tmp) / side for side in commits}
        try:
            for side, commit in commits.items():
                git("worktree", "add", "--detach", str(trees[side]), commit)
            yield trees
        finally:
            for tree in trees.values():
                if tree.exists():
                    git("worktree", "remove", "--force", str(tree))


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="the commit to compare against")
    ap.add_argument("--new", default="HEAD", help="the commit under test")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--name", default="ab_commits")
    args = ap.parse_args()
    concs = [int(c) for c in args.concurrency.split(",")]
    commits = {"base": git("rev-parse", args.base), "new": git("rev-parse", args.new)}
    runs: dict[str, list[dict]] = {"base": [], "new": []}
    with worktrees(commits) as trees:
        for r in range(args.rounds):
            for side, path in trees.items():
                res = run_tree(path, concs)
                runs[side].append(res)
                print(f"round {r} {side}: " + ", ".join(
                    f"{c}: {res['decode_tok_per_s'][str(c)]:.1f}" for c in concs)
                    + f", prefill {res['prefill_tok_per_s_2k']:.0f} tok/s", flush=True)
    figures = summarize(runs, concs)
    from kvmesh.model import cpu_isa

    figures.update(cpu_isa.describe())
    path = save(args.name, {**commits, "rounds": args.rounds, "concurrency": concs}, figures,
                {"method": "fresh process per run, sides alternated; best per side; "
                           "ratio = new best / base best"})
    print(json.dumps({k: v for k, v in figures.items() if k.startswith("ratio")}, indent=1))
    print(f"wrote {path}")


def summarize(runs: dict[str, list[dict]], concs: list[int]) -> dict:
    out: dict = {"decode_tok_per_s": {}, "all_runs": {}, "prefill_tok_per_s_2k": {}}
    for side, results in runs.items():
        out["all_runs"][side] = {str(c): [r["decode_tok_per_s"][str(c)] for r in results]
                                 for c in concs}
        out["decode_tok_per_s"][side] = {c: max(v) for c, v in out["all_runs"][side].items()}
        out["prefill_tok_per_s_2k"][side] = max(r["prefill_tok_per_s_2k"] for r in results)
    for c in concs:
        out[f"ratio_new_vs_base_{c}"] = (out["decode_tok_per_s"]["new"][str(c)]
                                         / out["decode_tok_per_s"]["base"][str(c)])
    out["ratio_new_vs_base_prefill"] = (out["prefill_tok_per_s_2k"]["new"]
                                        / out["prefill_tok_per_s_2k"]["base"])
    return out


if __name__ == "__main__":
    main()
