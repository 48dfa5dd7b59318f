#!/usr/bin/env bash
# Train the organism on a lent GPU machine and bring the results back in parts under 16 MiB.
#
#   bash bench/gpu_train_organism.sh [train args...]
#
# Needs the diffusers wheel carried in a .whl*/ folder (bench/gpu_env.sh installs it).
# While training runs, the triton/flex GPU tests run beside it (correctness only, no timings).
# $OUT gets organism.tar.part.* (weights, loss.png, samples.*, train_info.json) and logs.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT" /tmp/site /tmp/organism
export TQDM_DISABLE=1
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > /tmp/logs_env.txt
( timeout 400 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/patterns tests/test_layout.py \
    > /tmp/logs_pytest.txt 2>&1 ) &
python3 -m sparse_vdit.organism.train --out /tmp/organism "$@" > /tmp/logs_train.txt 2>&1
wait
tail -5 /tmp/logs_train.txt
tail -15 /tmp/logs_pytest.txt
cat /tmp/logs_env.txt /tmp/logs_train.txt /tmp/logs_pytest.txt > "$OUT/logs.txt"
tar cf /tmp/organism.tar -C /tmp organism && split -b 15m /tmp/organism.tar "$OUT/organism.tar.part."
ls -la "$OUT"
