#!/usr/bin/env bash
# Fidelity of every method on the fidelity organism (issue #15), on one lent GPU, in under 9 minutes.
#
#   bash bench/gpu_fidelity.sh            (needs the diffusers wheel carried in .whl/: run(carry=[".whl"]))
#
# 1. bench/oracle.py on the fidelity organism: per-head relative MSE of the oracle masks and the
#    search's candidates at block 128 (share of heads under 6e-4), and whole generations with the
#    static and per-call oracles at 10-50% density (PSNR / SSIM vs dense; ORACLE_S seconds at most).
# 2. bench/fidelity.py --model fidelity: dense, offline searches (relative error, and error="output"
#    which may skip heads), SVG, spatial / temporal windows, skip-only and both oracles, on
#    4 held-out captions x 2 seeds, 20 steps; methods not started within FIDELITY_BUDGET_S seconds are
#    listed as not run. The searched plans are saved.
# $OUT gets oracle-fidelity.json, fidelity-fidelity.{json,png,md}, plans.tar (searched plans) and logs.txt.
# Weights: src/sparse_vdit/organism/weights-fidelity (WEIGHTS=DIR for others, e.g. a fresher run).
# To try it on the CPU: PY=.venv/bin/python DEVICE=cpu WEIGHTS=<tiny organism> STEPS=2 ORACLE_STEPS=2
# CAPTIONS=1 SEEDS=0 OUT=/tmp/x bash bench/gpu_fidelity.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export TQDM_DISABLE=1
source bench/gpu_env.sh
WEIGHTS=${WEIGHTS:-src/sparse_vdit/organism/weights-fidelity}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-20}              # denoising steps of every generation and search
ORACLE_STEPS=${ORACLE_STEPS:-12}  # of the generation whose q/k/v the per-head scoring records
CAPTIONS=${CAPTIONS:-4}         # evaluation captions (data seed 777); searches use 4 held-out ones (seed 4242)
SEEDS=${SEEDS:-0 1}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > /tmp/logs_env.txt 2>&1
cat /tmp/logs_env.txt
start=$(date +%s)

timeout "${ORACLE_S:-150}" $PY bench/oracle.py --weights "$WEIGHTS" --device "$DEVICE" --captions 1 \
    --steps "$ORACLE_STEPS" --blocks 128 --densities 0.1 0.15 0.25 0.35 0.5 \
    --generate-densities 0.1 0.15 0.25 0.35 0.5 --gen-captions "$CAPTIONS" --gen-seeds 0 --gen-steps "$STEPS" \
    --out "$OUT/oracle-fidelity.json" > /tmp/logs_oracle.txt 2>&1
echo "oracle exit $? after $(( $(date +%s) - start )) s" | tee -a /tmp/logs_oracle.txt
grep -E "^block 128|^\| (per-call|static) [0-9]" /tmp/logs_oracle.txt
grep -A14 "^whole generations" /tmp/logs_oracle.txt

timeout "${FIDELITY_S:-330}" $PY bench/fidelity.py --model fidelity --weights "$WEIGHTS" --device "$DEVICE" \
    --captions "$CAPTIONS" --seeds $SEEDS --steps "$STEPS" --search-captions 4 \
    --epsilons 0.001,0.003,0.01,0.03 --output-epsilons 0.01,0.03 \
    --svg-densities 0.5,0.35,0.25 --spatial-widths 2,1,0.5 --temporal-widths 0.2,0.1 \
    --oracle-densities 0.5,0.25,0.15 --budget-s "${FIDELITY_BUDGET_S:-250}" \
    --save-plans /tmp/plans --out "$OUT/fidelity-fidelity.json" > /tmp/logs_fidelity.txt 2>&1
echo "fidelity exit $? after $(( $(date +%s) - start )) s" | tee -a /tmp/logs_fidelity.txt
grep "^\[" /tmp/logs_fidelity.txt | tail -30
[ -f "$OUT/fidelity-fidelity.md" ] && cat "$OUT/fidelity-fidelity.md"
[ -d /tmp/plans ] && tar cf "$OUT/plans.tar" -C /tmp plans
cat /tmp/logs_env.txt /tmp/logs_oracle.txt /tmp/logs_fidelity.txt > "$OUT/logs.txt"
ls -la "$OUT"
