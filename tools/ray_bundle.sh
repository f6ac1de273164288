#!/usr/bin/env bash
# bash tools/ray_bundle.sh [OUTDIR]          (on a machine with network; OUTDIR defaults to .whl, which git ignores)
#
# Ray for an air-gapped GPU host that has torch, transformers and peft but no Ray: one tar.xz of an unpacked
# site folder (Ray 2.60 for CPython 3.12 on x86-64 Linux without ray/jars, ray/rllib, ray/llm and ray/serve, which
# Ray Train and the job CLI never import, plus the packages Ray needs that such an image lacks), about 31 MB against
# the 79 MB wheel. DeepSpeed, pydantic and hjson come as wheels from ../shared/offline_wheels.sh into the same
# OUTDIR. On the host (docs/RAY.md, "Ray on an air-gapped GPU host"):
#     bash tools/ray_gpu.sh setup      # unpacks both into /tmp/site, imports ray.train.torch, starts/stops a head
#
#   PY_VERSION=3.11 bash tools/ray_bundle.sh /tmp/b --check: the same bundle for this machine's CPython, then
#       unpacked into a temp dir and checked: ray.train.torch imports from it and a local head starts and stops,
#       with nothing but the temp dir on PYTHONPATH besides the interpreter's own packages
set -euo pipefail
out=${1:-.whl}
check=${2:-}
py_version=${PY_VERSION:-3.12}
ray_version=${RAY_VERSION:-2.60.0}
py=${PYTHON:-python3}
# Ray's own requirements (core, [default] for the dashboard and `ray job`, [train]) that the GPU image lacks; the
# image has aiohttp, click, filelock, fsspec, grpcio, msgpack, packaging, pandas, prometheus-client, protobuf,
# pyarrow, pyyaml, requests, six, wrapt. Without opencensus (and google.rpc, which it imports) the dashboard
# starts in its minimal mode, with no HTTP server for `ray job submit`. py-spy, tensorboardX and virtualenv stay
# out: Ray Train and the job CLI run without them. tools/ray_smoke.py names any requirement of Ray's that the
# host does not meet.
deps=(
  jsonschema jsonschema-specifications referencing rpds-py
  aiohttp-cors colorful smart-open opencensus opencensus-context googleapis-common-protos
  opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-exporter-prometheus
  opentelemetry-semantic-conventions
)
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tag=cp${py_version/./}
# pip installs for another interpreter when it is told the target's version and platform (binary wheels only)
"$py" -m pip install -q --no-deps --no-compile --only-binary=:all: --target "$work/site" \
  --python-version "$py_version" --implementation cp --abi "$tag" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  "ray==$ray_version" "${deps[@]}"
# `pip --target` wrote console scripts for this machine's interpreter; the host makes its own `ray`
rm -rf "$work/site/bin" "$work/site/ray/jars" "$work/site/ray/rllib" "$work/site/ray/llm" "$work/site/ray/serve"
bundle="$out/ray-$ray_version-$tag-site.tar.xz"
tar -C "$work/site" -cJf "$bundle" .
ls -la "$bundle"

if [[ $check == --check ]]; then
  site=$(mktemp -d)
  trap 'rm -rf "$work" "$site"' EXIT
  tar -C "$site" -xJf "$bundle"
  # deepspeed comes from offline_wheels.sh, not this bundle: only Ray's side is checked here
  PYTHONPATH=$site "$py" tools/ray_smoke.py --require pydantic
fi
