"""Where a CUDA decode step's time goes: torch.profiler over greedy decoding of one
sequence (the step is the whole batch at concurrency 1). Prints kernel launches per step,
GPU busy time per step and the wall time per step, then the top operators."""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from kvmesh import LLM, SamplingParams

llm = LLM(device="cuda", dtype="bfloat16", enable_prefix_caching=False)
prompt = [[100 + i for i in range(64)]]
steps = 32
p = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
llm.generate(prompt, p)
torch.cuda.synchronize()
start = time.perf_counter()
llm.generate(prompt, p)
wall = (time.perf_counter() - start) / steps
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    llm.generate(prompt, p)
    torch.cuda.synchronize()
events = prof.key_averages()
kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
gpu_us = sum(e.self_device_time_total for e in events
             if e.device_type == torch.autograd.DeviceType.CUDA)
print(f"PROFILE wall_ms_per_step={wall * 1e3:.2f} kernels_per_step={kernels / steps:.0f} "
      f"gpu_busy_ms_per_step={gpu_us / 1e3 / steps:.3f}")
print(events.table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=48))
