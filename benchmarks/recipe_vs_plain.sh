#!/usr/bin/env bash
# uniret's CPU recipe against the plain recipe of issue #13 at equal wall clock, in one session:
#
#   bash benchmarks/recipe_vs_plain.sh bench64.lmdb OUT [MINUTES=15] [METHOD=uscrr] [SEED=0] [MODE=serial]
#
# MODE=serial (default): one after the other, each with every core of the machine for MINUTES (the
# issue's setting: "15 minutes on this 2-core CPU"); keep the machine otherwise idle. MODE=parallel:
# both AT THE SAME TIME, one thread each, so the load of a shared machine hits both alike. Then both
# are evaluated on the test split the same way (merged protocol, uniret's eval code). Nothing is
# selected on the test split: the recipe run validates nowhere (val_every 0) and exports its last
# weights, as the plain one does.
#
# RECIPE=FILE picks the uniret recipe (default benchmarks/recipes/cpu_scratch.json; e.g.
# benchmarks/recipes/cpu_cnn6.json trains the plain recipe's own CNN, plain:cnn6, through `uniret
# train`); METHOD=- keeps the recipe's method. RANKS=N (serial mode) trains the recipe as N data-parallel
# CPU processes under torchrun (gloo), one thread each, instead of one process with every thread: on
# this 2-core machine RANKS=2 also decodes and augments on both cores (~1.1x the images per second
# for the 6-conv CNN). The plain recipe always runs as one process with every thread.
#
# Writes OUT/plain/summary.json, OUT/recipe/ (the run), OUT/recipe-report/ and OUT/comparison.md.
set -euo pipefail

DATA=${1:?usage: recipe_vs_plain.sh DATA OUT [MINUTES] [METHOD] [SEED]}
OUT=${2:?usage: recipe_vs_plain.sh DATA OUT [MINUTES] [METHOD] [SEED]}
MINUTES=${3:-15}
METHOD=${4:-uscrr}
SEED=${5:-0}
MODE=${6:-serial}
HERE=$(cd "$(dirname "$0")" && pwd)
RECIPE=${RECIPE:-$HERE/recipes/cpu_scratch.json}
METHOD_ARGS=()
if [ "$METHOD" != "-" ]; then METHOD_ARGS=(--method "$METHOD"); fi
PY=${PYTHON:-python}
mkdir -p "$OUT"
if [ "$MODE" = parallel ]; then
    export OMP_NUM_THREADS=1
    THREADS=1
else
    THREADS=$(nproc)
fi

echo "[recipe_vs_plain $(date +%H:%M:%S)] $MODE: training both for $MINUTES min, $THREADS thread(s) each, load: $(cut -d' ' -f1-3 /proc/loadavg)"
if [ ! -f "$OUT/plain/summary.json" ]; then
    "$PY" "$HERE/plain_recipe.py" --data "$DATA" --out "$OUT/plain" --minutes "$MINUTES" --threads "$THREADS" \
        --seed "$SEED" > "$OUT/plain.log" 2>&1 &
    plain=$!
    if [ "$MODE" != parallel ]; then wait "$plain"; fi
    echo "[recipe_vs_plain $(date +%H:%M:%S)] plain recipe started/done, load: $(cut -d' ' -f1-3 /proc/loadavg)"
fi
if [ ! -f "$OUT/recipe/summary.json" ]; then
    rm -rf "$OUT/recipe"
    LAUNCH=("$PY" -m uniret.cli)
    if [ "${RANKS:-1}" -gt 1 ]; then
        LAUNCH=(env OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone --nproc_per_node "$RANKS" -m uniret.cli)
    fi
    "${LAUNCH[@]}" train --data "$DATA" --config "$RECIPE" "${METHOD_ARGS[@]}" \
        --seed "$SEED" --time-budget "$MINUTES" --val-every 0 --ckpt-every 0 --device cpu --out "$OUT/recipe" \
        > "$OUT/recipe.log" 2>&1
fi
if [ -n "${plain:-}" ]; then wait "$plain"; fi
echo "[recipe_vs_plain $(date +%H:%M:%S)] evaluating the recipe's model, load: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" -m uniret.cli eval --model "$OUT/recipe" --data "$DATA" --split test --out "$OUT/recipe-report" \
    --device cpu --batch-size 256 --overwrite > "$OUT/recipe-eval.log" 2>&1

"$PY" - "$OUT" "$MINUTES" "$METHOD" "$MODE" <<'PY'
import json, sys
from pathlib import Path

out, minutes, method = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
plain = json.loads((out / "plain" / "summary.json").read_text())
run = json.loads((out / "recipe" / "summary.json").read_text())
report = json.loads((out / "recipe-report" / "metrics.json").read_text())["results"]["merged"]
rows = [("plain recipe (6-conv CNN, joint classifier)", plain["steps"], plain["train_seconds"], plain["merged"]),
        (f"uniret CPU recipe ({method})", run["steps"], run["train_seconds"], report["mean"])]
mode = sys.argv[4]
how = "one after the other, every core each" if mode == "serial" else "at the same time, one thread each"
lines = [f"merged test protocol, {minutes} min of training each, {how}", "",
         "| recipe | steps | train s | mAP@100 | mMP@5 | R@1 |", "|---|---|---|---|---|---|"]
for name, steps, seconds, m in rows:
    lines.append(f"| {name} | {steps} | {seconds:.0f} | {m['mAP@100']:.3f} | {m['mMP@5']:.3f} | {m['R@1']:.3f} |")
(out / "comparison.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
