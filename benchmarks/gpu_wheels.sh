#!/usr/bin/env bash
# Fill ./.whl with what benchmarks/gpu_pipeline.sh needs on a GPU box that cannot download: the packages of
# benchmarks/gpu_wheels.txt (pinned; the ones such a box's image lacks next to torch, transformers, peft, accelerate,
# numpy, pandas, pyarrow, aiohttp, grpcio, prometheus-client, ...), built for CPython ${PYVER:-3.12} on manylinux
# x86_64, and Ray. Ray's wheel (79 MB) is cut to what a Ray cluster of Python stages runs — no Java jar, RLlib,
# Serve or LLM libraries; binaries without their symbol tables — and packed as .tar.xz (28 MB; .whl in all 38 MB), so that
# .whl and the checkout together stay under 64 MiB. Run it where pip reaches PyPI; gpu_pipeline.sh installs
# .whl/*.whl and unpacks .whl/*.tar.xz into /tmp/site when `import ray` fails.
#
#   bash benchmarks/gpu_wheels.sh && du -sh .whl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PYVER=${PYVER:-3.12}
RAY=${RAY:-2.60.0}
DEST=.whl
mkdir -p "$DEST"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${platforms[@]}" -d "$1" "${@:2}"
}
download "$DEST" -r benchmarks/gpu_wheels.txt

root=$PWD
slim="$root/$DEST/ray-$RAY-slim.tar.xz"
if [[ ! -f "$slim" ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  download "$tmp" "ray==$RAY"
  mkdir "$tmp/unpacked"
  unzip -q "$tmp"/ray-*.whl -d "$tmp/unpacked"  # unzip keeps the executables' mode bits
  cd "$tmp/unpacked"
  rm -rf ray/jars ray/rllib ray/serve ray/llm
  strip --strip-unneeded ray/_raylet.so
  strip ray/core/src/ray/gcs/gcs_server ray/core/src/ray/raylet/raylet
  tar -cf - ray ray-*.dist-info | xz -T0 -6 > "$slim.tmp"
  mv "$slim.tmp" "$slim"
  cd "$root"
fi
du -sh "$DEST"
