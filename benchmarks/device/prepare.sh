#!/usr/bin/env bash
# Here, before a lent GPU machine's run: fill .whl with cp312 wheels of what that machine's
# image lacks (versions as in this checkout's .venv) and .gpu/small with the default
# model's config and tokenizer. Both are ignored by git (add them to .git/info/exclude)
# and travel as `carry: [".whl", ".gpu"]`; then `run`: bash benchmarks/device/run.sh
set -eu
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
# Not in the image (KINDS.md's list), needed by kvmesh, its tests and the openai client.
NAMES="annotated-types fastapi gguf httptools jiter jsonschema jsonschema-specifications
referencing rpds-py llguidance msgspec openai pydantic pydantic-core typing-inspection pyzmq
sniffio starlette uvicorn websockets python-dotenv watchfiles typing-extensions anyio httpx
httpcore h11 opentelemetry-api httpx2 httpcore2 truststore idna certifi annotated-doc
aiohttp aiohappyeyeballs aiosignal frozenlist multidict propcache yarl attrs"
mkdir -p .whl .gpu/small
for name in $NAMES; do
  version=$($PY -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$version" ] || { echo "skip $name (not in .venv)"; continue; }
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_31_x86_64 -d .whl \
    "$name==$version" 2>/tmp/kvmesh-pip-download.err \
    || { grep -v "^WARNING" /tmp/kvmesh-pip-download.err; exit 1; }
done
model=$($PY -c "from kvmesh.model.registry import resolve_model as r; print(r('smollm2-135m-instruct').path)")
cp "$model"/{config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja,generation_config.json} .gpu/small/
du -sh .whl .gpu
