#!/usr/bin/env bash
# GPU check on a lent machine: install carried FA4 wheels (if any), run the gpu tests, run the benchmark.
#
#   bash bench/gpu_check.sh [bench args...]     (logs and attention.json go to $OUT, default ./out)
#
# Wheels: FlashAttention-4 and its CuTe DSL come as wheels for Python 3.12 (see bench/NOTES.md).
# The cutlass-dsl CUDA 13 library wheel (~92 MB) is over what one device call carries, so it
# travels in two halves: an earlier call copies .whl/ (small wheels + cu13.part.aa) to
# /tmp/wheels, and this call finds cu13.part.ab in .whl2/. Wheels already in /tmp/wheels or an
# install already in /tmp/site (a warm machine) are reused.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT" /tmp/wheels
export PYTHONUNBUFFERED=1

for d in .whl .whl2; do
    [ -d "$d" ] && cp -n "$d"/* /tmp/wheels/ 2>/dev/null
done
if ls /tmp/wheels/cu13.part.* >/dev/null 2>&1; then
    if [ -f /tmp/wheels/cu13.part.aa ] && [ -f /tmp/wheels/cu13.part.ab ]; then
        cat /tmp/wheels/cu13.part.aa /tmp/wheels/cu13.part.ab \
            >/tmp/wheels/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
        rm -f /tmp/wheels/cu13.part.*
    else
        echo "only one half of the cu13 wheel is here: $(ls /tmp/wheels/cu13.part.*)" >&2
    fi
fi
if [ ! -d /tmp/site/flash_attn ] && ls /tmp/wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site /tmp/wheels/*.whl || echo "wheel install failed" >&2
fi
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD/src:${PYTHONPATH:-}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    python3 - <<'EOF'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
from sparse_vdit.kernels import api
dev = torch.device("cuda", 0)
for name in ("fa4", "triton", "flex"):
    print(name, api._availability(name, dev))
EOF
} 2>&1 | tee "$OUT/env.txt"

export SPARSE_VDIT_TEST_LOG="$OUT/test_errors.jsonl"
rm -f "$SPARSE_VDIT_TEST_LOG"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/kernels tests/patterns tests/test_layout.py 2>&1 | tee "$OUT/pytest.log" | tail -40
python3 bench/attention.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
