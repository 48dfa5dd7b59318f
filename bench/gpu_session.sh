#!/usr/bin/env bash
# One lent-GPU call that runs named benchmark steps, each under its own time limit, and packs every
# result and log into $OUT/results.tar (the device returns at most 8 files).
#
#   bash bench/gpu_session.sh [STEP ...]      (wheels carried as bench/gpu_env.sh says)
#   TRITON39=1 bash bench/gpu_session.sh ...  (the steps under the carried Triton 3.9: bench/gpu_env.sh)
#
# Steps (default: fidelity svg attention, the set run on 2026-11-23; seconds in parentheses):
#   fidelity       organism fidelity, searches included: bench/fidelity.py --steps 12 --paper   (~140)
#   svg            SVG layer call, fast path vs flex, profiling overhead: bench/svg.py           (~50)
#   attention      block-sparse attention, fa4 + triton: bench/attention.py                      (~125)
#   svg-sweep      SVG profiling launch shapes (programs per SM x tiles), Wan-14B 25%             (~180)
#   triton-tuned   Triton with measured tiles (--triton-autotune) on two shapes                   (~150)
#   search-cost    offline search vs one dense generation at real size, Wan-1.3B                  (~200)
#   search-profile one warm search (ours, Wan-1.3B, 5 steps) under torch.profiler                (~90)
#   e2e-compiled   end to end with torch.compile, Wan-1.3B and CogVideoX1.5, 25% and 10%          (~300)
#   e2e-wan14b     end to end eager, Wan-14B, 25% and SVG 25%                                     (~150)
#   e2e-wan14b-compiled  the same with torch.compile (no flex row)                               (~300)
#   variants       kernel options A/B: Triton attention (TMA, warp spec.), SVG profiling kernel    (~300)
#   tests          the GPU tests: kernels, patterns, layout, SVG's fused profiling kernel         (~330; ran past 300 s in session o)
#   backward       backward block efficiency, Triton, Wan-1.3B and HunyuanVideo, 10-50% (#18)   (~110)
#   finetune       sparse-aware LoRA fine-tuning of the fidelity organism, 10% and 25% (#18)   (~200)
#   new-tests      GPU tests of this session's kernels: backward, select, online, SVG step path,
#                  fused rotary / head order (263 s on 2026-12-03: compiles dominate)             (~270)
#   processor      the whole processor attention call, old vs fused rotary+permutation (#21)     (~70)
#   svg-overhead   SVG layer / attention, before vs after the step-path cuts, Wan 25% (#16)    (~60)
#   online-cost    online top-k/top-p selection cost vs the attention it saves, Wan-14B (#22)  (~30)
#   fidelity-online  every method incl. top-p, top-k, hybrid on the fidelity organism, short (#22) (~110)
#   fa4-tests      FA4 against the reference (every layout, bf16/fp16) and through sparse_attention (~100)
#   processor-all  the processor call on all four shapes, FA4 and Triton, every path (#21)         (~130)
#   e2e-wan13b     Wan-1.3B compiled: plans 25%/10%, SVG on the device vs its own plan, top-k and
#                  hybrid at 25%, Triton (#16, #21, #22)                                         (~250)
#   e2e-a14b       Wan2.2-A14B 720p, both experts, eager, 25% (#17; E2E_BACKEND, default triton) (~220)
#   e2e-hunyuan15  HunyuanVideo 1.5 720p, eager, 25% (#17)                                       (~180)
#   fidelity-svg   SVG as its authors run it vs each of our variants, fidelity organism (#16)     (~120)
#   session-d-tests  GPU tests of session d's helpers: CUDA graphs, compiled online selection, head
#                  order sweep variants, finetune in bf16                                        (~120)
#   online-cost2   selection old / eager / compiled / grouped, attention vs the plan's tables (#22) (~150)
#   e2e-online     Wan-1.3B compiled: plan vs top-k, grouped, every-2, hybrid at 25% (#22)         (~150)
#   svg-sweep2     SVG profile kernel tiles x programs per SM, Wan-1.3B and Wan-14B (#16)       (~210)
#   backward-variants  Triton backward: the default (and any --variants), check + time, Wan / Hunyuan (#18) (~60)
#   locality       where the fidelity organism's attention mass goes, per step / layer (#15)         (~60)
#   processor-sweep  fused pass options, kernel tiles, winners of the whole call, four shapes (#21)  (~240)
#   processor-default  the processor call with #21's new defaults (no sweep), four shapes, FA4 + Triton, with
#                  the rotary-excluded efficiency (rotary and cuDNN timed alone)                    (~110)
#   online-list    online-cost2 plus the Triton kernel's block-list mode beside the ranges (sparse list,
#                  list vs plan), Wan-1.3B 480p and Wan-14B 720p, 25% (#22)                       (~200)
#   e2e-online-list  Wan-1.3B compiled: plan vs top-k in the range mode vs top-k in the block-list mode,
#                  hybrid, 25%, Triton (#22)                                                      (~150)
#   tests-f        GPU tests of session f's changes: online GPU, block list, CUDA graphs              (~120)
#   tests-g        GPU tests of session g's changes: FA4's block-sparse backward against float64 (bf16/fp16,
#                  head dims 64/128: FA4 compiles dominate; block lists at 5 stages are in tests-f)  (~240)
#   backward-fa4   backward block efficiency, FA4's block-sparse backward vs the Triton one behind the same
#                  FA4 forward (fa4 vs fa4/triton), Wan-1.3B 480p and HunyuanVideo 720p, 10-50% (#18) (~420)
#   e2e-profile    Wan-1.3B compiled 25%: plan, top-k, hybrid (ranges and lists), each forward once more under
#                  torch.profiler (where the hybrid's time goes; E2E_BACKEND, default triton) (#22) (~110)
#   tests-h        GPU tests of session h's changes: the hybrid's layer call without a host sync, online GPU (~60)
#   backward-profile  FA4's block-sparse backward at Wan-1.3B 480p 10% under torch.profiler (its 0.73) (#18) (~60)
#   tests-i        GPU tests of session i's changes: every Triton backward variant (stored dS) against float64 (~90)
#   tests-i-fa4    GPU tests of the fa4 backward through the op that now keeps the permuted q, k, v (#18) (~240)
#   backward-fa4-saved  FA4's block-sparse backward with the permuted q, k, v kept, Wan-1.3B 480p 10-50%,
#                  each row profiled (the permutation copies left) (#18)                         (~120)
#   backward-i     Triton backward: the default (stored dS) vs recompute, Wan-1.3B / HunyuanVideo 10-50% (#18) (~120)
#   backward-ceiling  Triton backward at 10% and 75% (bands): the kernel's own rate against cuDNN's, profiled (#18) (~60)
#   backward-j     Triton backward (dS tiles by wide stores, session j): default vs recompute, as backward-i (#18) (~100)
#   backward-ceiling-j  backward-ceiling, profiled, as of session j (#18) (~30)
#   backward-kinds-j  Triton backward by pattern kind (band, multi-diagonal, vertical, mixed), profiled (#18) (~120)
#   backward-tm-j  Triton backward on multi-diagonal and mixed plans (token-major heads), default vs recompute (#18) (~100)
#   backward-final-j  Triton backward, every pattern kind, 10/25/50%, both shapes, as adopted in session j (#18) (~100)
#   tests-k        GPU tests of the fused path's backward (head order both ways) and the Triton backward (#18) (~150)
#   train-step-l   one training step (attention projections train, checkpointing), Wan-1.3B eager and
#                  compiled, unpatched / dense / 25% / 10% (#18)                                 (~200)
#   train-step-hunyuan-l  the same, HunyuanVideo 720p, eager (did not finish its first step in 210 s)
#   train-step-wan14b-l  the same, Wan-14B 720p, eager, one timed step a variant                  (~400)
#   train-step-profile-l  Wan-1.3B compiled: unpatched, dense, 25%, each step profiled             (~150)
#   train-step-hunyuan-m  HunyuanVideo 720p eager, our dense plan / 25% / 10% (no unpatched row)   (~200)
#   tests-n        GPU tests of training: the tiny Wan's gradients (eager, Inductor), the compiled fused op without
#                  a replayed forward, the Inductor backward against eager (#18)                 (~150)
#   tests-n2       GPU tests of compiled training from the LSE: dense layers by cuDNN, the plan's tables on
#                  triton and fa4, bf16, no replayed call; the CUDA-graph tests (#18)              (~150)
#   train-step-n   one training step, Wan-1.3B compiled: unpatched / dense / 25% / 10%, Triton (#18) (~100)
#   train-step-fa4-n  the same eager and compiled with the fa4 backend (its wheels carried) (#18)  (~250)
#   train-step-hunyuan-n  HunyuanVideo 720p eager, the sparse rows only (25%, 10%; dense plan: train-step-hunyuan-m) (~200)
#   backward-calls-k  the whole processor call's backward, rotary included: old vs fused path, multi-diagonal and
#                  mixed, 10-50% (CALL_SHAPES, default Wan-1.3B 480p) (#18) (~200)
#   backward-calls-profile-k  the same at 10% on Wan-1.3B 480p under torch.profiler: operator and call tables (#18) (~60)
#   processor-ceiling-triton / processor-ceiling-fa4  the processor call on four shapes with the dense
#                  kernels alone (cuDNN, the backend's own), for the metric's ceilings; one backend each (#21) (~150)
#   backward-profile-triton  the Triton backward's kernels under torch.profiler, mixed 10%: CogVideoX1.5 (D 64)
#                  and Wan-1.3B (#18's last cell) (~60)
#   backward-d64   the Triton backward at head dim 64 (CogVideoX1.5 768p), default vs the recomputing dQ, 10-50% (#18) (~60)
#   tests-t        GPU tests of the Triton backward's variants (dp-early among them) and 12 random layers under
#                  every variant (hypothesis, session w) (#18) (~200)
#   backward-t-d64  default vs dp-early at head dim 64 (CogVideoX1.5 768p), band / mixed, 10-50% (#18) (~120)
#   backward-x     the Triton backward's variants: default, recompute, dp-early (dP's MMAs beside the
#                  exponentials); band / multi-diagonal / mixed, 10-50%, Wan-1.3B and HunyuanVideo (#18) (~170)
#   backward-energy  the Triton backward with the card's joules per call (NVML), watts and energy efficiency
#                  beside block efficiency; band / multi-diagonal / mixed, 10-50%, Wan-1.3B and HunyuanVideo (#18) (~150)
#   backward-ncu   Nsight Compute counters of the Triton backward's kernels (Wan-1.3B mixed and band 10%) beside
#                  cuDNN's dense backward: tensor pipe, issue slots, stalls (bench/backward_counters.py) (~150)
#   tests-ab       GPU tests of the backward's variants and the warp-specialised Gluon dK/dV kernel (#18)     (~90)
#   backward-ab    the Triton backward, default (dK/dV by the Gluon kernel on sm90: a producer warp, two consumer
#                  warpgroups) vs triton-dkdv vs gluon-all (also where dQ recomputes); band / multi-diagonal / mixed,
#                  10-50%, Wan-1.3B and HunyuanVideo (#18) (~150)
#   backward-ncu-ab  backward-ncu's counters for triton-dkdv (the Triton dK/dV kernel on sm90), Wan-1.3B mixed 10% (~70)
#   backward-d64-ab  head dim 64 (CogVideoX1.5 768p): default (the Triton dK/dV kernel there) vs gluon-all, band / mixed (~60)
#   backward-ac    backward-ab's cells, default vs triton-dkdv (HunyuanVideo 50%: heads over the share in key-block
#                  windows, no longer recomputing dQ) (#18)                                          (~300)
#   tests-ad       tests-ab's selection (now with the side-out variant) and side-out's gradients through the
#                  fused path against the default's, bit for bit (#18)                              (~110)
#   backward-side-ad  mixed tables (token-major heads beside the others), default vs side-out: the passes back to
#                  frame-major over token-major heads only; Wan-1.3B and HunyuanVideo, 10-50% (#18)  (~120)
#   backward-ae    #18's grid (Gluon "all" the default), default vs side-out; then mixed tables with side-out timed
#                  first; head dim 64 (CogVideoX1.5) default vs gluon-d128 (the earlier default) (#18)    (~160)
#   backward-af    #18's grid, the default (side-out, Gluon "all") in 3 rounds (medians; host ms a call beside the
#                  GPU's); then mixed tables, default vs all-heads-out, 3 rounds in alternating order (#18)  (~260)
#   backward-ag    #18's grid under the default in 3 rounds (medians) (#18)  (~200; sessions ae-af also timed the
#                  dkdv-rows-out variant here, removed with it: git 3606b85, 3b35f88)
#   backward-paired-ag  #18's grid with cuDNN timed beside each row (bench/backward.py's paired reference, now its
#                  default): Wan-1.3B default (the dQ split) vs no-split / dq-split-50 in 3 rounds, HunyuanVideo the
#                  default in 2 (#18; session ag ran it at bbc688f's names: dq-split-25-deep, default, dq-split-50-deep,
#                  and dq-split-25 with 3 stages)                                                              (~250)
# Keep one call under 10 minutes: e.g. `svg-sweep triton-tuned search-cost`, then `e2e-compiled e2e-wan14b`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
R=/tmp/results
[ "${TRITON39:-0}" = 1 ] && R=/tmp/results/t39  # under the carried Triton 3.9: beside the image Triton's
mkdir -p "$OUT" "$R"
source bench/gpu_env.sh
export TQDM_DISABLE=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv > "$R/env.txt"
# SM clock, power and throttle reasons every 5 s while the steps run (session x's H100 sat at its power cap).
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,power.limit,temperature.gpu,clocks_throttle_reasons.active \
    --format=csv -l 5 >> "$R/clocks.csv" 2>/dev/null &  # appended: runs sharing a folder keep every log
CLOCKS=$!
pack() { tar cf "$OUT/results.tar" -C /tmp results; }
trap 'kill "$CLOCKS" 2>/dev/null; pack' EXIT

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $R/NAME.log, say how it went
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    # past its limit a step gets SIGABRT first: Python's faulthandler writes every thread's stack to the log (session
    # ae's first machine hung two steps, the GPU at 1980 MHz and ~130 W, with nothing logged to say where)
    PYTHONFAULTHANDLER=1 timeout -k 15 -s ABRT "$limit" "$@" > "$R/$name.log" 2>&1
    echo "$name: rc $? in $((SECONDS - t0)) s"
    tail -n "${TAIL:-25}" "$R/$name.log"
    pack
}

[ $# -gt 0 ] || set -- fidelity svg attention
for name in "$@"; do
    case $name in
    fidelity) step fidelity 250 python3 bench/fidelity.py --steps 12 --paper --save-plans "$R/plans" \
        --out "$R/fidelity.json" ;;
    svg) TAIL=8 step svg 120 python3 bench/svg.py --shapes wan14b-720p wan1.3b-480p --profile-backends triton \
        --budget-s 90 --out "$R" ;;
    attention) TAIL=40 step attention 150 python3 bench/attention.py --backends fa4 triton --budget-s 120 --out "$R" ;;
    svg-sweep) mkdir -p "$R/svg-sweep" && TAIL=30 step svg-sweep 240 python3 bench/svg.py --shapes wan14b-720p \
        --densities 0.25 --profile-backends triton --programs-per-sm 2 4 8 16 32 \
        --tiles default 32,64,8,2 32,32,4,2 16,32,4,2 16,64,4,3 --budget-s 200 --out "$R/svg-sweep" ;;
    triton-tuned) mkdir -p "$R/tuned" && TAIL=40 step triton-tuned 200 python3 bench/attention.py --backends triton \
        --triton-autotune --shapes wan1.3b-480p hunyuan-720p --budget-s 160 --out "$R/tuned" ;;
    search-cost) step search-cost 300 python3 bench/search_cost.py --models wan-1.3b --modes ours,paper --repeats 2 \
        --budget-s 260 --save-plans "$R/search-plans" --out "$R/search_cost.json" ;;
    search-profile) TAIL=60 step search-profile 200 python3 bench/search_cost.py --models wan-1.3b --modes ours \
        --steps 5 --repeats 1 --no-unpatched --no-progress --budget-s 170 --profile "$R/profile" \
        --out "$R/search_profile.json" ;;
    e2e-compiled) step e2e-compiled 330 python3 bench/e2e.py --models wan-1.3b,cogvideox1.5 --modes compiled \
        --densities 0.25,0.1 --svg-densities 0.25 --svg-backends auto --repeats 2 --budget-s 300 \
        --out "$R/e2e_compiled.json" ;;
    e2e-wan14b) step e2e-wan14b 200 python3 bench/e2e.py --models wan-14b --modes eager --densities 0.25 \
        --svg-densities 0.25 --svg-backends auto,flex --repeats 1 --budget-s 180 --out "$R/e2e_wan14b.json" ;;
    e2e-wan14b-compiled) step e2e-wan14b-compiled 400 python3 bench/e2e.py --models wan-14b --modes compiled \
        --densities 0.25 --svg-densities 0.25 --svg-backends auto --repeats 1 --budget-s 370 \
        --out "$R/e2e_wan14b_compiled.json" ;;
    variants) TAIL=80 step variants 540 python3 bench/kernel_variants.py --densities 0.1 0.3 1.0 --out "$R" ;;
    tests) TAIL=6 step tests 480 bash -c "python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels \
        tests/patterns tests/test_layout.py tests/methods; python3 -m pytest -q -p no:cacheprovider \
        tests/methods/test_svg.py -k triton" ;;
    backward) TAIL=30 step backward 120 python3 bench/backward.py --shapes wan1.3b-480p hunyuan-720p \
        --densities 0.1 0.25 0.5 --kinds band multi_diag mixed --backends triton --budget-s 90 --out "$R" ;;
    finetune) TAIL=20 step finetune 240 python3 bench/finetune.py --densities 0.1 0.25 --minutes 1.25 \
        --captions 4 --seeds 0 --out "$R" ;;
    new-tests) TAIL=12 step new-tests 300 python3 -m pytest -q -p no:cacheprovider -m gpu \
        tests/kernels/test_backward.py tests/kernels/test_select.py tests/methods/test_online_gpu.py \
        tests/methods/test_svg_step_path.py tests/kernels/test_head_order.py ${NEW_TESTS:-} ;;
    processor) TAIL=40 step processor 75 python3 bench/processor_attention.py --shapes wan1.3b-480p hunyuan-720p \
        --densities 0.05 0.1 0.2 0.4 --kinds multi_diag mixed --backends triton --budget-s 60 --out "$R" ;;
    svg-overhead) TAIL=30 step svg-overhead 60 python3 bench/svg.py --overhead --modes reference --variants before \
        after --tiles default 64,32,8,3 --programs-per-sm 8 2 --reps 10 --budget-s 45 --out "$R" ;;
    online-cost) TAIL=20 step online-cost 35 python3 bench/online_cost.py --shapes wan14b-720p --densities 0.25,0.1 \
        --backends triton --out "$R/online-cost.json" ;;
    fidelity-online) TAIL=45 step fidelity-online 115 python3 bench/fidelity.py --model fidelity --device cuda \
        --captions 2 --seeds 0 --steps 20 --search-captions 2 --epsilons 0.03 --output-epsilons 0.03 --svg-densities 0.25 \
        --spatial-widths "" --temporal-widths "" --oracle-densities 0.25 --online-ps 0.9 --topk-densities 0.35,0.25 \
        --cluster-ps "" --hybrid-ps 0.9 --hybrid-densities 0.25 --no-skip-only --budget-s 90 \
        --out "$R/fidelity-online.json" ;;
    fa4-tests) TAIL=8 step fa4-tests 120 python3 -m pytest -q -p no:cacheprovider -m gpu -x \
        tests/kernels/test_gpu_backends.py -k fa4 ;;
    processor-all) TAIL=70 step processor-all 140 python3 bench/processor_attention.py --shapes wan1.3b-480p \
        hunyuan-720p wan14b-720p cogvideox1.5-768p --densities 0.05 0.1 0.2 0.4 --kinds multi_diag mixed \
        --backends fa4 triton --target-ms 60 --budget-s 115 --out "$R" ;;
    e2e-wan13b) step e2e-wan13b 270 python3 bench/e2e.py --models wan-1.3b --modes compiled --densities 0.25,0.1 \
        --svg-densities 0.25 --svg-backends triton-device,triton-plan --online-densities 0.25 \
        --online-cluster-iters 0 --repeats 3 --backend triton --budget-s 240 --out "$R/e2e_wan13b.json" ;;
    e2e-a14b) step e2e-a14b 250 python3 bench/e2e.py --models wan2.2-a14b --modes eager --densities 0.25 \
        --svg-densities "" --online-densities "" --repeats 1 --backend "${E2E_BACKEND:-triton}" --budget-s 225 \
        --out "$R/e2e_a14b.json" ;;
    e2e-hunyuan15) step e2e-hunyuan15 230 python3 bench/e2e.py --models hunyuan1.5 --modes eager --densities 0.25 \
        --svg-densities "" --online-densities "" --repeats 1 --backend "${E2E_BACKEND:-triton}" --budget-s 210 \
        --out "$R/e2e_hunyuan15.json" ;;
    fidelity-svg) TAIL=20 step fidelity-svg 150 python3 bench/fidelity.py --model fidelity --device cuda \
        --captions 2 --seeds 0 1 --steps 20 --epsilons "" --svg-densities 0.25 --svg-variants ours \
        profile_masks=executed row_sampling=stratified widths=fitted sink=false choice=batch_mean \
        --spatial-widths "" --temporal-widths "" --oracle-densities "" --online-ps "" --topk-densities "" \
        --cluster-ps "" --hybrid-ps "" --no-skip-only --budget-s 130 --out "$R/fidelity-svg.json" ;;
    session-d-tests) TAIL=8 step session-d-tests 200 python3 -m pytest -q -p no:cacheprovider -m gpu \
        tests/integrations/test_cuda_graphs.py tests/methods/test_online_gpu.py tests/kernels/test_head_order.py \
        tests/integrations/test_finetune.py ;;
    online-cost2) TAIL=30 step online-cost2 420 python3 bench/online_cost.py --shapes wan1.3b-480p wan14b-720p \
        --backends triton --densities 0.25 --cluster-iters 0 --out "$R/online-cost2.json" ;;
    e2e-online) step e2e-online 300 python3 bench/e2e.py --models wan-1.3b --modes compiled --densities 0.25 \
        --svg-densities "" --online-densities 0.25 --online-cluster-iters 0 --online-key-groups 2,4 --online-every 2 \
        --repeats 3 --backend triton --budget-s 270 --out "$R/e2e_online.json" ;;
    svg-sweep2) TAIL=40 step svg-sweep2 240 python3 bench/svg.py --kernel-sweep --shapes wan1.3b-480p wan14b-720p \
        --modes reference --densities 0.25 --reps 20 --finalists 3 --budget-s 210 --out "$R" ;;
    backward-variants) TAIL=40 step backward-variants 200 python3 bench/backward.py --shapes wan1.3b-480p hunyuan-720p \
        --densities 0.1 0.25 0.5 --kinds mixed --backends triton --variants default --target-ms 300 \
        --budget-s 170 --out "$R" ;;
    processor-sweep) TAIL=60 step processor-sweep 260 python3 bench/processor_attention.py --sweep --shapes \
        wan1.3b-480p cogvideox1.5-768p wan14b-720p hunyuan-720p --densities 0.05 0.1 0.2 0.4 --kinds multi_diag mixed \
        --backends triton --target-ms 100 --budget-s 210 --out "$R" ;;
    processor-default) TAIL=70 step processor-default 150 python3 bench/processor_attention.py --shapes wan1.3b-480p \
        hunyuan-720p wan14b-720p cogvideox1.5-768p --densities 0.05 0.1 0.2 0.4 --kinds multi_diag mixed \
        --backends fa4 triton --target-ms 60 --budget-s 120 --out "$R/processor-default" ;;
    online-list) TAIL=30 step online-list 480 python3 bench/online_cost.py --shapes wan1.3b-480p wan14b-720p \
        --backends triton --densities 0.25 --cluster-iters 0 --block-list --out "$R/online-list.json" ;;
    e2e-online-list) step e2e-online-list 300 python3 bench/e2e.py --models wan-1.3b --modes compiled --densities 0.25 \
        --svg-densities "" --online-densities 0.25 --online-cluster-iters 0 --online-key-groups "" --online-every 1 \
        --online-block-list --repeats 5 --backend triton --budget-s 270 --out "$R/e2e_online_list.json" ;;
    locality) TAIL=22 step locality 100 python3 bench/locality.py --model fidelity --device cuda --captions 2 \
        --steps 20 --record 2 6 10 14 18 --out "$R/locality.json" ;;
    tests-g) TAIL=12 step tests-g 420 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_backward.py \
        tests/kernels/test_fa4_backward.py -k fa4 ;;
    backward-fa4) TAIL=40 step backward-fa4 480 python3 bench/backward.py --shapes wan1.3b-480p hunyuan-720p \
        --densities 0.1 0.25 0.5 --kinds mixed --backends fa4 fa4/triton --target-ms 300 --budget-s 420 \
        --out "$R/backward-fa4" ;;
    tests-f) TAIL=12 step tests-f 240 python3 -m pytest -q -p no:cacheprovider tests/methods/test_online_gpu.py \
        tests/kernels/test_triton_block_list.py tests/integrations/test_cuda_graphs.py ;;
    e2e-profile) b=${E2E_BACKEND:-triton}; step e2e-profile-$b 300 python3 bench/e2e.py --models wan-1.3b --modes compiled \
        --densities 0.25 --svg-densities "" --online-densities 0.25 --online-cluster-iters 0 --online-key-groups "" \
        --online-every 1 --online-block-list --repeats 3 --backend "$b" --budget-s 270 --profile "$R/e2e-profile-$b" \
        --out "$R/e2e_profile_$b.json" ;;
    tests-h) TAIL=12 step tests-h 200 python3 -m pytest -q -p no:cacheprovider tests/methods/test_online_gpu.py ;;
    tests-i) TAIL=12 step tests-i 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_backward.py \
        -k "gpu_triton_backward_variants or (gpu_backward and triton)" ;;
    tests-i-fa4) TAIL=12 step tests-i-fa4 300 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_backward.py \
        -k "gpu and fa4" ;;
    backward-fa4-saved) TAIL=30 step backward-fa4-saved 240 python3 bench/backward.py --shapes wan1.3b-480p \
        --densities 0.1 0.25 0.5 --kinds mixed --backends fa4 --profile --target-ms 200 --budget-s 200 \
        --out "$R/backward-fa4-saved" ;;
    backward-i) TAIL=14 step backward-i 300 python3 bench/backward.py --shapes wan1.3b-480p hunyuan-720p \
        --densities 0.1 0.25 0.5 --kinds mixed --backends triton --variants default recompute \
        --target-ms 150 --budget-s 270 --out "$R/backward-i" ;;
    backward-ceiling) TAIL=14 step backward-ceiling 150 python3 bench/backward.py --shapes wan1.3b-480p \
        --densities 0.1 0.95 --kinds band --backends triton --variants default recompute --profile \
        --target-ms 150 --budget-s 120 --out "$R/backward-ceiling" ;;
    backward-j) TAIL=16 step backward-j 330 python3 bench/backward.py --shapes wan1.3b-480p hunyuan-720p \
        --densities 0.1 0.25 0.5 --kinds mixed --backends triton --variants default recompute \
        --target-ms 120 --budget-s 300 --out "$R/backward-j" ;;
    backward-ceiling-j) TAIL=14 step backward-ceiling-j 150 python3 bench/backward.py --shapes wan1.3b-480p \
        --densities 0.1 0.95 --kinds band --backends triton --variants default recompute --profile \
        --target-ms 150 --budget-s 120 --out "$R/backward-ceiling-j" ;;
    backward-kinds-j) TAIL=20 step backward-kinds-j 200 python3 bench/backward.py --shapes wan1.3b-480p hunyuan-720p \
        --densities 0.1 0.5 --kinds band multi_diag vertical mixed --backends triton --profile \
        --target-ms 100 --budget-s 170 --out "$R/backward-kinds-j" ;;
    backward-tm-j) TAIL=18 step backward-tm-j 300 python3 bench/backward.py --shapes wan1.3b-480p hunyuan-720p \
        --densities 0.1 0.25 0.5 --kinds multi_diag mixed --backends triton --variants default recompute \
        --target-ms 100 --budget-s 270 --out "$R/backward-tm-j" ;;
    backward-final-j) TAIL=30 step backward-final-j 300 python3 bench/backward.py --shapes wan1.3b-480p hunyuan-720p \
        --densities 0.1 0.25 0.5 --kinds band multi_diag vertical mixed --backends triton \
        --target-ms 100 --budget-s 270 --out "$R/backward-final-j" ;;
    backward-profile) TAIL=20 step backward-profile 200 python3 bench/backward.py --shapes wan1.3b-480p \
        --densities 0.1 0.5 --kinds mixed --backends fa4 --profile --target-ms 200 --out "$R/backward-profile" ;;
    tests-k) TAIL=12 step tests-k 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_head_order_backward.py \
        tests/kernels/test_head_order.py tests/kernels/test_backward.py -k "(head_order or triton) and not sweep" ;;
    backward-calls-k) TAIL=60 step backward-calls-k 520 python3 bench/backward.py --shapes ${CALL_SHAPES:-wan1.3b-480p} \
        --densities 0.1 0.25 0.5 --kinds multi_diag mixed --backends triton --calls --target-ms 100 --budget-s 480 \
        --out "$R/backward-calls-k" ;;
    backward-calls-profile-k) TAIL=4 step backward-calls-profile-k 200 python3 bench/backward.py --shapes wan1.3b-480p \
        --densities 0.1 --kinds multi_diag mixed --backends triton --calls --profile --target-ms 100 --budget-s 150 \
        --out "$R/backward-calls-profile-k" ;;
    train-step-l) TAIL=14 step train-step-l 330 python3 bench/train_step.py --models wan-1.3b --modes eager,compiled \
        --densities 0.25,0.1 --repeats 3 --budget-s 300 --out "$R/train_step.json" ;;
    train-step-hunyuan-l) TAIL=10 step train-step-hunyuan-l 250 python3 bench/train_step.py --models hunyuan \
        --modes eager --densities 0.25,0.1 --repeats 2 --budget-s 220 --out "$R/train_step.json" ;;
    train-step-wan14b-l) TAIL=10 step train-step-wan14b-l 420 python3 bench/train_step.py --models wan-14b \
        --modes eager --densities 0.25,0.1 --repeats 1 --budget-s 400 --out "$R/train_step.json" ;;
    train-step-profile-l) TAIL=70 step train-step-profile-l 300 python3 bench/train_step.py --models wan-1.3b \
        --modes compiled --densities 0.25 --repeats 1 --profile "$R/train-step-profile" --budget-s 280 \
        --out "$R/train_step_profile.json" ;;
    train-step-hunyuan-m) TAIL=10 step train-step-hunyuan-m 300 python3 bench/train_step.py --models hunyuan \
        --modes eager --densities 0.25,0.1 --repeats 1 --no-unpatched --budget-s 280 --out "$R/train_step.json" ;;
    tests-n) TAIL=12 step tests-n 240 python3 -m pytest -q -p no:cacheprovider tests/integrations/test_training_gpu.py \
        tests/integrations/test_fused_rotary.py -k "training or trains" \
        tests/kernels/test_backward.py::test_gpu_backward_compiles_with_inductor_and_matches_eager ;;
    tests-n2) TAIL=12 step tests-n2 300 python3 -m pytest -q -p no:cacheprovider \
        tests/integrations/test_training_gpu.py tests/integrations/test_cuda_graphs.py tests/kernels/test_dense_lse.py ;;
    train-step-n) TAIL=10 step train-step-n 200 python3 bench/train_step.py --models wan-1.3b --modes compiled \
        --densities 0.25,0.1 --repeats 3 --budget-s 180 --out "$R/train_step_n.json" ;;
    train-step-fa4-n) TAIL=12 step train-step-fa4-n 330 python3 bench/train_step.py --models wan-1.3b \
        --modes eager,compiled --backend fa4 --densities 0.25,0.1 --repeats 3 --budget-s 300 --out "$R/train_step_fa4.json" ;;
    train-step-hunyuan-n) TAIL=10 step train-step-hunyuan-n 330 python3 bench/train_step.py --models hunyuan \
        --modes eager --densities 0.25,0.1 --repeats 1 --no-unpatched --no-dense --budget-s 300 --out "$R/train_step.json" ;;
    processor-ceiling-triton | processor-ceiling-fa4) TAIL=90 step "$name" 170 python3 bench/processor_attention.py \
        --shapes wan1.3b-480p hunyuan-720p wan14b-720p cogvideox1.5-768p --densities 0.05 0.1 0.2 0.4 --kinds \
        multi_diag mixed --backends "${name#processor-ceiling-}" --paths fused fused-permuted --target-ms 60 \
        --budget-s 140 --out "$R/$name" ;;
    backward-profile-triton) TAIL=80 step backward-profile-triton 150 python3 bench/backward.py --shapes \
        cogvideox1.5-768p wan1.3b-480p --densities 0.1 --kinds mixed --backends triton --profile --target-ms 100 \
        --out "$R/backward-profile-triton" ;;
    tests-t) TAIL=12 step tests-t 360 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_backward.py \
        -k "gpu_triton_backward_variants or random_layers" ;;
    backward-t-d64) TAIL=20 step backward-t-d64 200 python3 bench/backward.py --shapes cogvideox1.5-768p \
        --densities 0.1 0.25 0.5 --kinds band mixed --backends triton --variants default dp-early --target-ms 100 \
        --budget-s 160 --out "$R/backward-t-d64" ;;
    backward-x) TAIL=40 step backward-x 460 python3 bench/backward.py --shapes wan1.3b-480p hunyuan-720p \
        --densities 0.1 0.25 0.5 --kinds band multi_diag mixed --backends triton --variants default recompute \
        dp-early --target-ms 80 --budget-s 400 --out "$R/backward-x" ;;
    backward-energy) TAIL=30 step backward-energy 300 python3 bench/backward.py --shapes wan1.3b-480p hunyuan-720p \
        --densities 0.1 0.25 0.5 --kinds band multi_diag mixed --backends triton --energy --target-ms 80 \
        --budget-s 250 --out "$R/backward-energy" ;;
    backward-d64) TAIL=20 step backward-d64 280 python3 bench/backward.py --shapes cogvideox1.5-768p --densities 0.1 \
        0.25 0.5 --kinds band mixed --backends triton --variants default recompute --target-ms 150 --budget-s 230 \
        --out "$R" ;;
    tests-ab) TAIL=12 step tests-ab 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_backward.py \
        -k "gpu_triton_backward_variants or random_layers or gluon" tests/kernels/test_gluon_backward.py ;;
    backward-ab) TAIL=40 step backward-ab 450 python3 bench/backward.py --shapes wan1.3b-480p hunyuan-720p \
        --densities 0.1 0.25 0.5 --kinds band multi_diag mixed --backends triton --variants default triton-dkdv gluon-all \
        --target-ms 80 --budget-s 420 --out "$R/backward-ab" ;;
    backward-ncu-ab) TAIL=20 step backward-ncu-ab 300 python3 bench/backward_counters.py profile --shape wan1.3b-480p \
        --cells mixed:0.1 --variant triton-dkdv --out "$R/backward-ncu-ab" ;;
    backward-d64-ab) TAIL=20 step backward-d64-ab 200 python3 bench/backward.py --shapes cogvideox1.5-768p --densities \
        0.1 0.25 0.5 --kinds band mixed --backends triton --variants default gluon-all --target-ms 150 --budget-s 170 \
        --out "$R/backward-d64-ab" ;;
    backward-ac) TAIL=40 step backward-ac 450 python3 bench/backward.py --shapes wan1.3b-480p hunyuan-720p \
        --densities 0.1 0.25 0.5 --kinds band multi_diag mixed --backends triton --variants default triton-dkdv \
        --target-ms 80 --budget-s 420 --out "$R/backward-ac" ;;
    tests-ad) TAIL=12 step tests-ad 280 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_backward.py \
        -k "gpu_triton_backward_variants or random_layers or gluon" tests/kernels/test_gluon_backward.py \
        tests/kernels/test_head_order_backward.py::test_gpu_side_out_gives_the_default_gradients ;;
    backward-side-ad) TAIL=20 step backward-side-ad 240 python3 bench/backward.py --shapes wan1.3b-480p hunyuan-720p \
        --densities 0.1 0.25 0.5 --kinds mixed --backends triton --variants default side-out --target-ms 80 \
        --budget-s 220 --out "$R/backward-side-ad" ;;
    backward-ae) TAIL=30 step backward-ae 200 python3 bench/backward.py --shapes wan1.3b-480p hunyuan-720p \
        --densities 0.1 0.25 0.5 --kinds band multi_diag mixed --backends triton --variants default side-out \
        --target-ms 80 --budget-s 180 --out "$R/backward-ae"
        TAIL=12 step backward-side-ae 120 python3 bench/backward.py --shapes wan1.3b-480p hunyuan-720p --densities 0.1 \
        0.25 0.5 --kinds mixed --backends triton --variants side-out default --target-ms 80 --budget-s 100 \
        --out "$R/backward-side-ae"
        TAIL=12 step backward-d64-ae 100 python3 bench/backward.py --shapes cogvideox1.5-768p --densities 0.1 0.25 0.5 \
        --kinds band mixed --backends triton --variants default gluon-d128 --target-ms 150 --budget-s 80 \
        --out "$R/backward-d64-ae" ;;
    backward-af) TAIL=22 step backward-af 200 python3 bench/backward.py --shapes wan1.3b-480p hunyuan-720p \
        --densities 0.1 0.25 0.5 --kinds band multi_diag mixed --backends triton --variants default --rounds 3 \
        --target-ms 80 --budget-s 180 --out "$R/backward-af"
        TAIL=12 step backward-side-af 150 python3 bench/backward.py --shapes wan1.3b-480p hunyuan-720p --densities 0.1 \
        0.25 0.5 --kinds mixed --backends triton --variants default all-heads-out --rounds 3 --target-ms 80 \
        --budget-s 130 --out "$R/backward-side-af" ;;
    backward-ag) TAIL=22 step backward-ag 200 python3 bench/backward.py --shapes wan1.3b-480p hunyuan-720p \
        --densities 0.1 0.25 0.5 --kinds band multi_diag mixed --backends triton --variants default --rounds 3 \
        --target-ms 80 --budget-s 180 --out "$R/backward-ag" ;;
    backward-paired-ag) TAIL=16 step backward-paired-ag 170 python3 bench/backward.py --shapes wan1.3b-480p \
        --densities 0.1 0.25 0.5 --kinds band multi_diag mixed --backends triton --variants default no-split \
        dq-split-50 --rounds 3 --target-ms 60 --budget-s 150 --out "$R/backward-paired-ag"
        TAIL=16 step backward-paired-hy-ag 170 python3 bench/backward.py --shapes hunyuan-720p --densities 0.1 0.25 \
        0.5 --kinds band multi_diag mixed --backends triton --variants default --rounds 2 --target-ms 80 \
        --budget-s 150 --out "$R/backward-paired-hy-ag" ;;
    backward-ncu) TAIL=40 step backward-ncu 420 python3 bench/backward_counters.py profile --shape wan1.3b-480p \
        --cells mixed:0.1 band:0.1 --out "$R/backward-ncu" ;;
    *) echo "unknown step $name" >&2 ;;
    esac
done
