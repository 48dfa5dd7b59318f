#!/usr/bin/env bash
# GPU check on a lent machine: install carried FA4 wheels (if any), run the gpu tests, run the benchmark.
#
#   bash bench/gpu_check.sh [bench args...]     (logs and attention.json go to $OUT, default ./out)
#
# Wheels: see bench/gpu_env.sh (FA4 and its CuTe DSL for Python 3.12, carried in parts).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
source bench/gpu_env.sh

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    python3 - <<'EOF'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
from sparse_vdit.kernels import registry
dev = torch.device("cuda", 0)
for name in ("fa4", "triton", "flex"):
    print(name, registry.available(name, dev))
EOF
} 2>&1 | tee "$OUT/env.txt"

export SPARSE_VDIT_TEST_LOG="$OUT/test_errors.jsonl"
rm -f "$SPARSE_VDIT_TEST_LOG"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/kernels tests/patterns tests/test_layout.py 2>&1 | tee "$OUT/pytest.log" | tail -40
python3 bench/attention.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
