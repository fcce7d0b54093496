#!/usr/bin/env bash
# Issue #13's method study on the CPU: UDON (dynamic and round-robin) vs USCRR vs UJC in three
# regimes, several seeds, through benchmarks/bench_methods.py (every model selected on the
# validation split, the test split evaluated once per model, merged protocol):
#
#   scratch    the CPU recipe (benchmarks/recipes/cpu_scratch.json) from random init, plus two UDON
#              ablations: distillation stopped at the backbone, and the relational weight of batch
#              64 (relational_factor 0.125 at batch 128)
#   two-stage  stage 1 trains UJC on all training domains for 2 x STEPS with the CPU recipe; stage 2
#              starts every method from that backbone (recipes/cpu_stage2.json: backbone frozen for
#              the first 20%, its lr a tenth of the heads')
#   capacity   the student at 16-d and the teachers at 64-d (the paper's 1:4), recipes/cpu_capacity.json
#
#   bash benchmarks/method_study.sh bench64.lmdb OUT [STEPS=300] [SEEDS=0,1,2] [DEVICE=cpu] [REGIMES]
#
# REGIMES (default "scratch two-stage capacity") runs some of them, e.g. one per process:
#   for r in scratch two-stage capacity; do
#       OMP_NUM_THREADS=1 bash benchmarks/method_study.sh bench64.lmdb study 200 0,1,2 cpu $r & done; wait
#
# Rows per regime (environment): SCRATCH_ROWS, TWO_STAGE_ROWS, CAPACITY_ROWS (default: the four
# methods uscrr,ujc-size,udon-round_robin,udon-dynamic), ABLATIONS (default
# udon-rr-nodistill,udon-rr-rel-half; "" for none) on ABLATION_SEEDS (default: SEEDS); VAL_EVERY
# (default STEPS/3) validation interval in steps.
#
# Re-running continues (finished trainings and reports are kept). Each regime writes
# OUT/<regime>/results.md and results.json.
set -euo pipefail

DATA=${1:?usage: method_study.sh DATA OUT [STEPS] [SEEDS] [DEVICE]}
OUT=${2:?usage: method_study.sh DATA OUT [STEPS] [SEEDS] [DEVICE]}
STEPS=${3:-300}
SEEDS=${4:-0,1,2}
DEVICE=${5:-cpu}
REGIMES=${6:-scratch two-stage capacity}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python}
R=$HERE/recipes
COMMON=(--data "$DATA" --seeds "$SEEDS" --device "$DEVICE" --backbone timm:test_resnet --image-size 64
        --batch-size 128 --steps "$STEPS" --val-every "${VAL_EVERY:-$(( STEPS / 3 ))}")
METHODS=uscrr,ujc-size,udon-round_robin,udon-dynamic
SCRATCH_ROWS=${SCRATCH_ROWS:-$METHODS}
TWO_STAGE_ROWS=${TWO_STAGE_ROWS:-$METHODS}
CAPACITY_ROWS=${CAPACITY_ROWS:-$METHODS}
ABLATIONS=${ABLATIONS-udon-rr-nodistill,udon-rr-rel-half}
ABLATION_SEEDS=${ABLATION_SEEDS:-$SEEDS}
log() { echo "[method_study $(date +%H:%M:%S)] $*" >&2; }

for regime in $REGIMES; do
    log "$regime"
    case $regime in
    scratch)
        if [ -n "$ABLATIONS" ] && [ "$ABLATION_SEEDS" != "$SEEDS" ]; then  # ablations first, on their seeds
            "$PY" "$HERE/bench_methods.py" "${COMMON[@]}" --seeds "$ABLATION_SEEDS" --out "$OUT/scratch" \
                --config "$R/cpu_scratch.json" --rows "$ABLATIONS"
            rows=$SCRATCH_ROWS
        else
            rows=$SCRATCH_ROWS${ABLATIONS:+,$ABLATIONS}
        fi
        # the summary covers every report in OUT/scratch for SEEDS, the ablations' included
        "$PY" "$HERE/bench_methods.py" "${COMMON[@]}" --out "$OUT/scratch" --config "$R/cpu_scratch.json" \
            --rows "$rows" ;;
    two-stage)
        "$PY" "$HERE/bench_methods.py" "${COMMON[@]}" --out "$OUT/two-stage" --config "$R/cpu_stage2.json" \
            --stage1-steps "$(( 2 * STEPS ))" --stage1-method ujc --stage1-config "$R/cpu_scratch.json" \
            --rows "stage1,$TWO_STAGE_ROWS" ;;
    capacity)
        "$PY" "$HERE/bench_methods.py" "${COMMON[@]}" --out "$OUT/capacity" --config "$R/cpu_capacity.json" \
            --dim 16 --rows "$CAPACITY_ROWS" ;;
    *)
        echo "unknown regime $regime (scratch, two-stage, capacity)" >&2; exit 2 ;;
    esac
    log "$regime done: $OUT/$regime/results.md"
done
