#!/usr/bin/env bash
# Build llama.cpp's C++ `llama-server` from the llama.cpp tree vendored in the
# llama-cpp-python source distribution on PyPI (the only registry reachable here), with
# native CPU flags. Output: .peers/llamacpp/bin/llama-server and .peers/llamacpp/VERSION.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DEST="$ROOT/.peers/llamacpp"
PY="${PYTHON:-python3}"
if [ -x "$DEST/bin/llama-server" ] && grep -qx "llama-cpp-python $VERSION" "$DEST/VERSION" 2>/dev/null; then
  echo "llama-server already built: $DEST/bin/llama-server"; exit 0
fi
for tool in cmake c++ make; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install cmake g++ make)" >&2; exit 1; }
done
WORK="$(mktemp -d)"; trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK"
tar -xzf "$WORK"/llama_cpp_python-"$VERSION".tar.gz -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  -DBUILD_SHARED_LIBS=OFF > "$WORK/cmake.log"
cmake --build "$WORK/build" --target llama-server -j "$(nproc)" > "$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log" >&2; exit 1; }
mkdir -p "$DEST/bin"
cp "$WORK/build/bin/llama-server" "$DEST/bin/llama-server"
{ echo "llama-cpp-python $VERSION"; "$DEST/bin/llama-server" --version 2>&1 | head -3; } > "$DEST/VERSION"
cat "$DEST/VERSION"
