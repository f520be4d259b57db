#!/usr/bin/env bash
# One prepared pass on a lent CUDA machine (see docs/gpu.md):
# wheels from .whl, a random-weight stand-in for the default model, the CUDA tests, the
# CUDA benchmark, then the whole suite in parallel. Every step is bounded in time.
# Carry: .whl (cp312 wheels of what the image lacks) and .gpu/small (config + tokenizer).
set -u
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl 2>&1 | tail -3
export KVMESH_CACHE_DIR=/tmp/kvc PYTHONPATH="$PWD/src:$PWD:/tmp/site:/tmp/fake"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nproc; gcc --version | head -1
python3 -c "import torch, kvmesh, fastapi, llguidance, zmq; print('torch', torch.__version__, torch.version.cuda, torch.cuda.is_available())"
timeout 120 python3 benchmarks/device/random_default.py .gpu/small /tmp/kvc /tmp/fake 2>&1 | tail -1
echo "== tests/test_gpu.py"
timeout -s INT -k 10 100 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15
echo "== benchmarks/cuda_engine.py"
rm -f benchmarks/results/cuda_engine.json  # never hand back the committed file as new
timeout -s INT -k 10 ${BENCH_S:-200} python3 benchmarks/cuda_engine.py --repeats ${REPEATS:-3} 2>&1 \
  | grep -v "Loading weights\|Writing model" | tee "$OUT/bench.log" | tail -30
cp benchmarks/results/cuda_engine.json "$OUT/" 2>/dev/null
echo "== profile"
timeout -s INT -k 10 90 python3 benchmarks/device/profile_step.py > "$OUT/profile.txt" 2>&1
grep -A24 PROFILE "$OUT/profile.txt" | cut -c1-160 | head -30
echo "== suite"
timeout -s INT -k 20 ${SUITE_S:-240} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-10} \
  --dist loadfile --timeout 150 -rfE --junitxml="$OUT/junit.xml" \
  --ignore tests/server/test_schema_fuzz.py --ignore tests/mesh/test_netns.py tests \
  > "$OUT/suite.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/suite.log" | cut -c1-220 | tail -60
