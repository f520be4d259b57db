"""Default model, 2,000+-token prefix: a hit from host, from disk, and from disk after a
process restart gives exactly the cold run's greedy tokens."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvmesh import LLM, SamplingParams
from tests.texts import varied_prompts

pytestmark = pytest.mark.slow
P = SamplingParams(temperature=0.0, max_tokens=24)
BLOCK = 16


def long_prompts(tok) -> list[list[int]]:
    ids = tok.encode("\n\n".join(varied_prompts()))
    assert len(ids) > 6700
    question = tok.encode("\n\nQuestion: what is the main topic of the text above? Answer:")
    target = ids[:2100] + question
    others = [ids[2100 + i * 2300 : 2100 + (i + 1) * 2300] for i in range(2)]
    return [target, *others]


RESTART = """
import json, sys
from kvmesh import LLM, SamplingParams
llm = LLM(dtype="float32", num_blocks=160, host_bytes=200 * 737280, disk_path=sys.argv[1],
          disk_bytes=2 * 10**9)
prompt = json.loads(sys.argv[2])
out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24))[0]
disk = llm.engine.store.disk.stats
print("RESULT", json.dumps({"tokens": out.token_ids, "cached": out.num_cached_tokens,
                            "disk_hits": disk.hit_blocks}))
llm.close()
"""


def tiered(tmp_path=None, host_blocks: int = 400) -> LLM:
    return LLM(dtype="float32", num_blocks=160, host_bytes=host_blocks * 737280,
               disk_path=str(tmp_path) if tmp_path else None, disk_bytes=2 * 10**9)


def test_host_disk_and_restart_hits_are_identical(tmp_path):
    llm = tiered()
    assert llm.engine.runner.block_bytes == 737280
    target, *others = long_prompts(llm.get_tokenizer())
    cold = llm.generate([target], P)[0]
    assert cold.num_cached_tokens == 0
    llm.generate(others, P)  # pushes the target's blocks off the device, into host DRAM
    host_hit = llm.generate([target], P)[0]
    assert host_hit.token_ids == cold.token_ids
    assert host_hit.num_cached_tokens >= 2000
    assert llm.engine.store.host.stats.hit_blocks >= 2000 // BLOCK
    llm.close()

    llm = tiered(tmp_path, host_blocks=200)  # smaller than the traffic: it spills to disk
    assert llm.generate([target], P)[0].token_ids == cold.token_ids
    llm.generate(others, P)
    disk_hit = llm.generate([target], P)[0]
    assert disk_hit.token_ids == cold.token_ids
    assert disk_hit.num_cached_tokens >= 2000
    assert llm.engine.store.disk.stats.hit_blocks >= 50  # the tail; the head is in DRAM
    llm.close()

    r = subprocess.run([sys.executable, "-c", RESTART, str(tmp_path), json.dumps(target)],
                       capture_output=True, text=True, timeout=600, check=True)
    res = json.loads(r.stdout.split("RESULT", 1)[1])
    assert res["tokens"] == cold.token_ids
    assert res["cached"] >= 2000 and res["disk_hits"] >= 2000 // BLOCK
