#!/usr/bin/env bash
# One lent-GPU call that runs the organism fidelity benchmark (searches included), the SVG kernel
# benchmark and the attention benchmark (fa4 + triton), each under its own time limit, and packs
# everything into $OUT/results.tar (the device returns at most 8 files).
#
#   bash bench/gpu_session.sh            (wheels carried as bench/gpu_env.sh says)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
R=/tmp/results
mkdir -p "$OUT" "$R"
source bench/gpu_env.sh
export TQDM_DISABLE=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv > "$R/env.txt"
pack() { tar cf "$OUT/results.tar" -C /tmp results; }
trap pack EXIT

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $R/NAME.log, say how it went
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$R/$name.log" 2>&1
    echo "$name: rc $? in $((SECONDS - t0)) s"
    tail -n "${TAIL:-25}" "$R/$name.log"
    pack
}

step fidelity "${FIDELITY_S:-250}" python3 bench/fidelity.py --steps 12 --epsilons 0.02,0.05,0.1,0.2,0.4 --paper \
    --save-plans "$R/plans" --out "$R/fidelity.json"
TAIL=8 step svg "${SVG_S:-120}" python3 bench/svg.py --shapes wan14b-720p wan1.3b-480p --profile-backends triton \
    --budget-s 90 --out "$R"
TAIL=40 step attention "${ATTENTION_S:-150}" python3 bench/attention.py --backends fa4 triton --budget-s 120 --out "$R"
