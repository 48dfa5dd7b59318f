#!/usr/bin/env bash
# Train an organism on a lent GPU machine and bring the results back in parts under 16 MiB.
#
#   bash bench/gpu_train_organism.sh [train args...]        e.g. --preset fidelity --minutes 7.5
#
# Resumable: the run writes to $RUN_DIR (default /tmp/organism) on the GPU machine; when a
# checkpoint from an earlier call is still there (the machine stayed warm), the next call
# continues from it exactly (--resume; any --init/--preset given is then ignored), otherwise it
# starts as the arguments say (e.g. --init with the weights carried from this machine).
# WITH_TESTS=1 runs GPU tests beside training (correctness only, no timings); GPU_TESTS names them
# (default: tests/kernels tests/patterns tests/test_layout.py).
# Needs the diffusers wheel carried in a .whl*/ folder (bench/gpu_env.sh installs it).
# $OUT gets organism.tar.part.* (weights, loss.png, samples.*, train_info.json; not the
# checkpoint, which is larger than what a call brings back) and logs.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
RUN_DIR=${RUN_DIR:-/tmp/organism}
mkdir -p "$OUT" /tmp/site "$RUN_DIR"
export TQDM_DISABLE=1
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > /tmp/logs_env.txt
args=("$@")
if [ -f "$RUN_DIR/checkpoint.pt" ]; then
    kept=()
    skip=0
    for a in "${args[@]}"; do
        if [ $skip = 1 ]; then skip=0; continue; fi
        case "$a" in --init|--preset) skip=1; continue;; esac
        kept+=("$a")
    done
    args=(--resume "$RUN_DIR" "${kept[@]}")
    echo "resuming from $RUN_DIR/checkpoint.pt" | tee -a /tmp/logs_env.txt
fi
if [ "${WITH_TESTS:-0}" = 1 ]; then
    ( timeout 400 python3 -m pytest -q -p no:cacheprovider -m gpu ${GPU_TESTS:-tests/kernels tests/patterns tests/test_layout.py} \
        > /tmp/logs_pytest.txt 2>&1 ) &
fi
python3 -m sparse_vdit.organism.train --out "$RUN_DIR" "${args[@]}" > /tmp/logs_train.txt 2>&1
echo "train exit $?" >> /tmp/logs_train.txt
wait
nvidia-smi --query-gpu=memory.used --format=csv >> /tmp/logs_env.txt
grep -v "^train" /tmp/logs_train.txt | tail -12
[ -f /tmp/logs_pytest.txt ] && tail -15 /tmp/logs_pytest.txt
cat /tmp/logs_env.txt /tmp/logs_train.txt /tmp/logs_pytest.txt > "$OUT/logs.txt" 2>/dev/null
tar cf /tmp/organism.tar --exclude checkpoint.pt -C "$(dirname "$RUN_DIR")" "$(basename "$RUN_DIR")" \
    && split -b 15m /tmp/organism.tar "$OUT/organism.tar.part."
ls -la "$OUT"
