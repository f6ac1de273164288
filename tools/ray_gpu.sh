#!/usr/bin/env bash
# bash tools/ray_gpu.sh setup|job|deepspeed|test      (on the air-gapped 2-GPU host, from the checkout's root)
#
# The Ray Train path on a GPU host that has torch, transformers and peft but neither network nor Ray: .whl/ holds
# the wheels of ../shared/offline_wheels.sh (deepspeed, pydantic, hjson) and the Ray bundle of tools/ray_bundle.sh
# (ray-2.60.0-cp312-site.tar.xz), both made on a machine with network. Each step unpacks them into /tmp/site
# first when that is not done yet (a fresh machine), so each runs on its own:
#   setup      unpack; tools/ray_smoke.py --gpus 2: Ray's requirements, imports, a head on loopback,
#              `ray job submit --working-dir`, a 2-GPU Ray Train all-reduce over NCCL
#   job        a head on 127.0.0.1 (token auth), `ray job submit --working-dir . -- python3 launch/ray_train.py
#              --config launch/configs/qwen2_72b_ray.yaml`, the head stopped; the summary (tokens/s per GPU,
#              the driver's peak RSS, the workers' RSS and share of the base weights, plan, losses, the adapter's
#              files with sizes and sha256) printed and written with the run's small files to $OUT (or runs/ray_gpu)
#   deepspeed  the same YAML under the DeepSpeed launcher (2 GPUs), the same summary: the comparison for `job`
#   test       pytest -m gpu on tests/distributed/test_ray.py, test_ray_nodes.py and test_multinode.py: 2 GPU
#              workers with a worker killed, Ray two nodes of one GPU each with a node lost, DeepSpeed two nodes of
#              one GPU each, each against an uninterrupted single-node run on the same GPUs; log in $OUT/pytest.log;
#              more arguments go to pytest (`test -k multinode` runs one file's)
# A step's own output ends with one line `summary: {...}` (job, deepspeed) or pytest's result line.
set -euo pipefail
cd "$(dirname "$0")/.."
step=${1:?usage: tools/ray_gpu.sh setup|job|deepspeed|test}
site=/tmp/site
out=${OUT:-runs/ray_gpu}
mkdir -p "$out"
# NVLink multicast stays off on shared GPU hosts (one program using it can take the host's GPUs out of service)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 NCCL_SOCKET_IFNAME=lo
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
unset DS_ACCELERATOR  # DeepSpeed picks CUDA itself; a CPU setting left in the shell would reach every rank
py=$(command -v python3)

unpack() {
  if [[ ! -f $site/.unpacked ]]; then
    local bundle
    bundle=$(ls .whl/ray-*-cp312-site.tar.xz)
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    tar -C "$site" -xJf "$bundle"
    # the `ray` command: the bundle carries no console scripts (they would name the packing machine's python)
    mkdir -p "$site/bin"
    printf '#!%s\nimport sys\nfrom ray.scripts.scripts import main\nsys.exit(main())\n' "$py" >"$site/bin/ray"
    chmod +x "$site/bin/ray"
    touch "$site/.unpacked"
  fi
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} PATH=$site/bin:$PATH
}

head_pid=
start_head() {
  # loopback only: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray from swapping 127.0.0.1 for the host's address
  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
  RAY_AUTH_TOKEN=$("$py" -c 'import secrets; print(secrets.token_hex(16))')
  export RAY_AUTH_TOKEN
  ray_tmp=$(mktemp -d /tmp/ray-XXXX)
  setsid ray start --head --block --node-ip-address 127.0.0.1 --port 6379 --dashboard-host 127.0.0.1 \
    --dashboard-port 8265 --num-gpus 2 --num-cpus 12 --temp-dir "$ray_tmp" --object-store-memory 4000000000 \
    --disable-usage-stats >"$ray_tmp/head.log" 2>&1 &
  head_pid=$!
  trap stop_head EXIT
  for _ in $(seq 120); do
    "$py" -c 'import socket; socket.create_connection(("127.0.0.1", 8265), 1)' 2>/dev/null && return 0
    kill -0 "$head_pid" 2>/dev/null || { tail -40 "$ray_tmp/head.log"; exit 1; }
    sleep 1
  done
  echo "error: the Ray head did not come up"; tail -40 "$ray_tmp/head.log"; exit 1
}

stop_head() {
  # only this head's session: never `ray stop`, which stops every Ray on the host
  [[ -n $head_pid ]] && { kill -TERM -- -"$head_pid" 2>/dev/null || true; sleep 5; kill -KILL -- -"$head_pid" 2>/dev/null || true; }
  rm -rf "$ray_tmp"
}

summarize() {  # summarize RUN_DIR LOG LAUNCHER: one JSON line, and the run's small files next to it in $out
  "$py" - "$@" "$out" <<'EOF'
import hashlib, json, re, shutil, statistics, sys
from pathlib import Path
run, log, launcher, out = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
timed = [r for r in rows if r["step"] > 2] or rows  # the first steps warm up
results = json.loads((run / "eval.json").read_text())
plan = json.loads((run / "plan.json").read_text())
driver = re.findall(r"driver peak RSS ([0-9.]+) GiB", log.read_text(errors="replace"))
notes = [json.loads(p.read_text()) for p in sorted((run / "workers").glob("rank-*.json"))]
adapter = {p.name: [p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()] for p in sorted((run / "adapter").iterdir())}
summary = {
    "launcher": launcher,
    "steps": len(rows),
    "tokens_per_s_per_gpu": statistics.median(r["tokens_per_s"] for r in timed) / 2,
    "step_seconds": statistics.median(r["step_seconds"] for r in timed),
    "losses": [round(r["loss"], 4) for r in rows],
    "plan_layers": plan["layers"], "adapters": len(plan["modules"]),
    "driver_peak_rss_gib": float(driver[-1]) if driver else None,
    "worker_peak_rss_gib": results.get("peak_host_rss_gib_by_rank"),
    "base_held_fraction_by_rank": [h / results["base_parameters"]["total"] for h in results["base_parameters"]["held_by_rank"]],
    "plan_sha256_by_worker": sorted({n["plan_sha256"] for n in notes}),
    "peak_memory_gib": results.get("peak_memory_gib"), "seconds": results.get("seconds"),
    "eval_loss": [results.get("eval_loss_before"), results.get("eval_loss_after")],
    "adapter_files": adapter,
}
dest = out / launcher
dest.mkdir(parents=True, exist_ok=True)
for name in ("metrics.jsonl", "plan.json", "probe.json", "eval.json"):
    shutil.copy(run / name, dest / name)
shutil.copy(run / "adapter" / "adapter_config.json", dest / "adapter_config.json")
(dest / "summary.json").write_text(json.dumps(summary, indent=1))
print("summary:", json.dumps(summary))
EOF
}

case $step in
  setup)
    unpack
    "$py" tools/ray_smoke.py --gpus 2
    ;;
  job)
    unpack
    start_head
    run=$HOME/ray_results/qwen2_72b
    rm -rf "$run"
    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env-json "{\"env_vars\": {
      \"NCCL_NVLS_ENABLE\": \"0\", \"TORCH_SYMM_MEM_DISABLE_MULTICAST\": \"1\", \"NVSHMEM_DISABLE_NVLS\": \"1\",
      \"NCCL_SOCKET_IFNAME\": \"lo\", \"HF_HUB_OFFLINE\": \"1\", \"TOKENIZERS_PARALLELISM\": \"false\"}}" \
      -- python3 launch/ray_train.py --config launch/configs/qwen2_72b_ray.yaml "${@:2}" 2>&1 | tee "$out/job.log"
    summarize "$run" "$out/job.log" ray
    ;;
  deepspeed)
    unpack
    run=runs/ray_gpu_deepspeed
    rm -rf "$run"
    "$py" -m deepspeed.launcher.runner --num_gpus 2 --master_addr 127.0.0.1 --master_port 29531 launch/train.py \
      --config launch/configs/qwen2_72b_ray.yaml train.output_dir="$run" "${@:2}" 2>&1 | tee "$out/deepspeed.log"
    summarize "$run" "$out/deepspeed.log" deepspeed
    ;;
  test)
    unpack
    "$py" -m pytest -q -rs --durations=10 -m gpu -p no:cacheprovider tests/distributed/test_ray.py \
      tests/distributed/test_ray_nodes.py tests/distributed/test_multinode.py "${@:2}" 2>&1 | tee "$out/pytest.log"
    ;;
  *)
    echo "usage: tools/ray_gpu.sh setup|job|deepspeed|test" >&2
    exit 2
    ;;
esac
