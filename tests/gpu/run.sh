#!/usr/bin/env bash
# The engine under accelerate FSDP2 and DeepSpeed ZeRO-3 on 2 GPUs (needs: pip install -e '.[deepspeed]').
#   bash tests/gpu/run.sh
# Not collected by pytest (no test_*.py here). Each run: a tiny Llama, a probe from θ0, the distributed core selection (FSDP2: must equal the selection on the
# gathered magnitudes), θ0 restored bit-exactly, then a stage with the core frozen: frozen values bit-identical.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for cfg in fsdp2 zero3; do
  echo "== $cfg"
  accelerate launch --config_file "recipes/accelerate/$cfg.yaml" --num_processes 2 --mixed_precision no \
    tests/gpu/engine_check.py "$cfg"
done
echo "all GPU checks passed"
