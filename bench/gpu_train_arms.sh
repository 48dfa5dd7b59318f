#!/usr/bin/env bash
# Train several organisms from scratch side by side on one lent GPU, then measure each one's attention
# locality (bench/locality.py) and static / per-call oracle at 25% (bench/oracle.py): an A/B of what
# makes heads local at equal GPU time (#15). Timings are not measured here, so sharing the GPU is fine.
#
#   MINUTES=5.5 bash bench/gpu_train_arms.sh "NAME:TRAIN ARGS" ...
#   e.g. bash bench/gpu_train_arms.sh "base:" "detail1:--detail 1.0" "grid:--frames 16 --height 128 --width 128 --batch-size 8"
#
# Sizes measured on an H200 (2026-12-03): the fidelity preset at batch 32 holds ~65 GB, so three arms
# share the GPU at batch 16 (~35 GB each; the arms then run at ~14 videos/s each, 42 in all against
# 48 for one arm alone: the GPU is already full with one). Training MINUTES plus ~1.5 min of start-up
# and previews, then ~2.5 min of measurements (locality ~30 s, oracle ~90 s on the 16x32x32 grid):
# keep MINUTES <= 5.5 for one 10-minute call. STEPS=N stops every arm at N steps (equal steps instead
# of equal time: e.g. STEPS=361 against the 2026-12-03 arms, whose base reached 361 steps).
#
# Every arm runs `train --preset fidelity $COMMON <its args>` into /tmp/arms/NAME (no checkpoint: the
# weights are not brought back, only their measurements). $OUT gets arms.tgz: per arm the training log,
# train_info.json, loss.png, locality and oracle JSON and logs. Needs the diffusers wheel
# in a .whl*/ folder (bench/gpu_env.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
A=/tmp/arms
COMMON=${COMMON:---batch-size 16 --lr 4e-4 --warmup 200 --schedule constant --ema 0.99 --log-every 50 --workers 4}
mkdir -p "$OUT" "$A"
export TQDM_DISABLE=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$A/env.txt"
pack() {  # weights and preview videos stay behind (a call brings back at most ~16 MiB per file)
    tar czf "$OUT/arms.tgz" --exclude '*.safetensors' --exclude '*.gif' --exclude samples.png -C /tmp arms
}
trap pack EXIT

names=()
for arm in "$@"; do
    name=${arm%%:*}
    extra=${arm#*:}
    names+=("$name")
    # shellcheck disable=SC2086
    ( python3 -m sparse_vdit.organism.train --out "$A/$name" --preset fidelity --minutes "${MINUTES:-5.5}" \
        --steps "${STEPS:-1000000}" --no-checkpoint $COMMON $extra > "$A/$name.train.log" 2>&1
      echo "train exit $?" >> "$A/$name.train.log" ) &
done
wait
nvidia-smi --query-gpu=memory.used --format=csv >> "$A/env.txt"
for name in "${names[@]}"; do
    ( timeout 120 python3 bench/locality.py --weights "$A/$name" --device cuda --captions 2 --steps 20 \
        --record 2 10 18 --out "$A/$name.locality.json" > "$A/$name.locality.log" 2>&1
      timeout 150 python3 bench/oracle.py --weights "$A/$name" --device cuda --captions 1 --steps 12 --blocks 128 \
        --densities 0.25 --generate-densities 0.25 --gen-captions 2 --gen-seeds 0 --gen-steps 20 \
        --out "$A/$name.oracle.json" > "$A/$name.oracle.log" 2>&1 ) &
done
wait
for name in "${names[@]}"; do
    echo "== $name"
    grep -E "^step|loss" "$A/$name.train.log" | tail -2
    tail -3 "$A/$name.train.log"
    tail -8 "$A/$name.locality.log"
    tail -6 "$A/$name.oracle.log"
done
python3 bench/locality.py --summarize "$A"/*.locality.json
