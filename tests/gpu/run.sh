#!/usr/bin/env bash
# GPU checks (not collected by pytest: no test_*.py here).
#
#   bash tests/gpu/run.sh            # 2 GPUs: the engine under accelerate FSDP2 and DeepSpeed ZeRO-3
#                                    #   (tests/gpu/engine_check.py; needs pip install -e '.[deepspeed]')
#   bash tests/gpu/run.sh one-gpu    # 1 GPU, <= 5 minutes, no network, no downloaded weights (tests/gpu/one_gpu.py)
#   bash tests/gpu/run.sh one-gpu --cpu   # the same phases on a tiny shape on the CPU (a check of the script)
#
# one-gpu: phases in order of value, each bounded by `timeout` and each writing $OUT/<phase>.json as it finishes, so
# a run cut off later still reports: select (select_core timed over a Llama-3.2-1B-shaped model's elements), trainer
# (SFTTrainer vs multi-task DPITrainer, FSDP2 config at num_processes 1), zero3 (the DeepSpeed refusal and the ZeRO-3
# engine at num_processes 1). Packages missing on the GPU machine (trl, datasets, deepspeed and their needs) travel
# as cp312 wheels in .whl/ (carried, ignored by git) and are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "${1:-}" != "one-gpu" ]; then
  set -e
  for cfg in fsdp2 zero3; do
    echo "== $cfg"
    accelerate launch --config_file "recipes/accelerate/$cfg.yaml" --num_processes 2 --mixed_precision no \
      tests/gpu/engine_check.py "$cfg"
  done
  echo "all GPU checks passed"
  exit 0
fi

cpu=0; [ "${2:-}" = "--cpu" ] && cpu=1
export OUT="${OUT:-$PWD/gpu-out}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
status=0
run_phase() {  # name, seconds, command...
  local name=$1 seconds=$2; shift 2
  local t0=$SECONDS
  timeout "$seconds" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "{\"phase\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >"$OUT/$name.rc.json"
  echo "== $name: rc $rc in $((SECONDS - t0)) s"; grep "^== " "$OUT/$name.log" || tail -5 "$OUT/$name.log"
  [ "$rc" -eq 0 ] || status=1
}

if [ "$cpu" = 1 ]; then
  # the carry: every wheel installs for CPython 3.12 on x86-64 Linux, and it fits the 64 MiB a call may carry
  python -m pip install -q --dry-run --no-index --no-deps --ignore-installed --target /tmp/dpi-carry-check \
    --python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_17_x86_64 .whl/*.whl \
    && echo "== carry: $(ls .whl | wc -l) wheels, $(du -sm .whl | cut -f1) MiB, all install for cp312" || status=1
  run_phase select 300 python tests/gpu/one_gpu.py select --tiny
  # accelerate turns FSDP on only for accelerators: on the CPU the trainer phase runs unsharded
  run_phase trainer 600 python tests/gpu/one_gpu.py trainer --tiny
  echo "(zero3 needs a GPU: skipped on the CPU)"
  exit $status
fi

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" || exit 1
fi
python3 - <<'EOF' >"$OUT/versions.json"
import json, importlib
mods = ["torch", "transformers", "accelerate", "trl", "datasets", "deepspeed", "peft", "pyarrow", "fsspec"]
out = {}
for m in mods:
    try:
        out[m] = importlib.import_module(m).__version__
    except Exception as exc:  # noqa: BLE001
        out[m] = f"missing: {exc}"
import torch
out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print(json.dumps(out))
EOF
cat "$OUT/versions.json"
run_phase select 60 python3 tests/gpu/one_gpu.py select
run_phase trainer 150 accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 1 \
  tests/gpu/one_gpu.py trainer
run_phase zero3 90 accelerate launch --config_file recipes/accelerate/zero3.yaml --num_processes 1 \
  tests/gpu/one_gpu.py zero3
exit $status
