#!/usr/bin/env bash
# Infection-model training on a lent GPU machine (the workplace's `device` tool), as one script:
#   1. a 40-step smoke run that also times a training step;
#   2. 5-fold cross-validation of the recipe variants below, all folds in parallel on the GPU;
#   3. the final model (all 50 slices) of the two variants with the best mean Dice over folds.
# Inputs, prepared beside the repository and carried to the machine (not in git):
#   .gpu/monai.tgz  the monai package (pure Python; the GPU image has torch but not monai)
#   .gpu/aux.npz    python bench/infection_aux.py --out .gpu/aux.npz (writes aux.json too)
#   .gpu/covid2d/   medseg_train/ and every 4th unlabelled slice (hence --unlabeled-stride 1)
#   .gpu/commit     the git commit of the code being run (the copy has no .git)
# Output: $OUT/gpu_results.tgz (CV parts, final model folders, logs) and $OUT/summary.txt.
set -u
export PYTHONUNBUFFERED=1 COVIDTRACK_THREADS=1
SITE=/tmp/site; mkdir -p "$SITE" && tar xzf .gpu/monai.tgz -C "$SITE"
export PYTHONPATH="$SITE:$PWD" COVIDTRACK_HOME=/tmp/cthome COVIDTRACK_CODE_COMMIT="$(cat .gpu/commit)"
W=/tmp/work; rm -rf "$W"; mkdir -p "$W/logs"
PY=python3
D=.gpu/covid2d
DEV=${DEV:-cuda}  # dry run here: DEV=cpu ITER_SCALE=0.002 SMOKE_SIZE=64 DRY_SIZE=64 OUT=/tmp/o bash bench/gpu_infection.sh
COMMON="--images $D/medseg_train --unlabeled $D/unlabeled_slices --unlabeled-stride 1 --device $DEV --aux-npz .gpu/aux.npz --intensity-aug 0.35 --batch-size 16"
declare -A V
V[s256]="--size 256 --iterations 2500 --student-iterations 0"
V[s352]="--size 352 --iterations 2500 --student-iterations 0"
V[s256st]="--size 256 --iterations 2500 --student-iterations 1200"
V[s256long]="--size 256 --iterations 5000 --student-iterations 0"
for n in "${!V[@]}"; do [[ " ${ONLY:-$n} " == *" $n "* ]] || unset "V[$n]"; done  # ONLY="s256 s352"
CV_LIMIT=${CV_LIMIT:-300}
DEADLINE=${DEADLINE:-555}  # seconds: everything ends before the 600 s device limit
START=$(date +%s)
finish() {
  tar czf "$OUT/gpu_results.tgz" -C "$W" . 2>/dev/null
  echo "total $(( $(date +%s) - START )) s" | tee -a "$OUT/summary.txt"
}
trap finish EXIT

nvidia-smi -L || true
$PY -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__, 'cuda', torch.cuda.is_available())" || exit 1

# 1. smoke + step time (SKIP_SMOKE=1 with ITER_SCALE set: straight to the cross-validation)
if [ -z "${SKIP_SMOKE:-}" ]; then
  timeout 100 $PY bench/infection_cv.py --name smoke $COMMON --size ${SMOKE_SIZE:-256} --iterations 150 --student-iterations 0 \
    --folds 0 --out "$W/smoke" > "$W/logs/smoke.log" 2>&1 || { cat "$W/logs/smoke.log"; exit 1; }
fi
grep -E "step|Dice" "$W/logs/smoke.log" 2>/dev/null
# seconds per 256 px step of a lone process, steps 100-150 (after cudnn autotuning)
STEP=$($PY -c "
import re, sys
t = {int(m[0]): float(m[1]) for m in re.findall(r'step (\d+)/150 loss [0-9.]+ \(([0-9.]+) s\)', open(sys.argv[1]).read())}
print(max(t[150] - t[100], 0.05) / 50)" "$W/logs/smoke.log" 2>/dev/null || echo 0.02)
# work of all variants in 256 px steps (352 px ~ 1.9x); assume 3 processes overlap on the GPU
SCALE=$($PY -c "
work = 5 * (2500 + 2500 * 1.9 + 2500 + 1200 + 5000)
print(round(min(1.0, ($CV_LIMIT - 50) / (work * $STEP / 3)), 3))")
SCALE=${ITER_SCALE:-$SCALE}
echo "step ${STEP} s, iteration scale $SCALE at $(( $(date +%s) - START )) s" | tee -a "$OUT/summary.txt"

# 2. cross-validation, every fold of every variant at once
for name in "${!V[@]}"; do
  args=$($PY -c "
import sys; a = sys.argv[1].split(); s = float(sys.argv[2])
for flag in ('--iterations', '--student-iterations'):
    i = a.index(flag); a[i + 1] = str(int(round(int(a[i + 1]) * s)))
print(' '.join(a))" "${V[$name]}" "$SCALE")
  [ -n "${DRY_SIZE:-}" ] && args=$(echo "$args" | sed "s/--size [0-9]*/--size $DRY_SIZE/")
  V[$name]="$args"
  echo "$name: $args" | tee -a "$OUT/summary.txt"
  for k in 0 1 2 3 4; do
    timeout "$CV_LIMIT" $PY bench/infection_cv.py --name "$name" $COMMON $args --folds $k --out "$W/cv/$name" \
      > "$W/logs/cv_${name}_$k.log" 2>&1 &
  done
done
wait
echo "cv done at $(( $(date +%s) - START )) s" | tee -a "$OUT/summary.txt"
grep -h "student Dice" "$W"/logs/cv_*.log | sort | tee -a "$OUT/summary.txt"

# 3. rank the variants (all 5 folds present) and train the final model of the best two
RANK=$($PY - "$W/cv" <<'EOF'
import json, sys
from pathlib import Path
rows = []
for d in sorted(Path(sys.argv[1]).iterdir()):
    parts = [json.loads(p.read_text()) for p in sorted(d.glob("fold*.json"))]
    if len(parts) == 5:
        m = sum(p["student_tta"]["mean"]["dice"]["mean"] for p in parts) / 5
        rows.append((m, d.name))
rows.sort(reverse=True)
print(" ".join(name for _, name in rows[:2]))
for m, name in rows:
    print(f"{name}: mean Dice over folds {m:.4f}", file=sys.stderr)
EOF
)
[ -z "$RANK" ] && RANK=s256  # no variant finished all folds: train the plainest one
echo "best: $RANK" | tee -a "$OUT/summary.txt"
LEFT=$(( DEADLINE - ($(date +%s) - START) ))
echo "final models get $LEFT s" | tee -a "$OUT/summary.txt"
for name in $RANK; do
  timeout $LEFT $PY -m covidtrack train infection --images $D/medseg_train/Imgs --masks $D/medseg_train/GT \
    --multiclass $D/medseg_train/GT_multiclass --unlabeled $D/unlabeled_slices --unlabeled-stride 1 --device $DEV \
    --aux-npz .gpu/aux.npz --intensity-aug 0.35 --batch-size 16 ${V[$name]} --out "$W/final_$name" --version v3 \
    --notes "recipe variant $name (bench/gpu_infection.sh); cross-validation in bench/results/infection_cv_$name.json" \
    > "$W/logs/final_$name.log" 2>&1 &
done
wait
tail -n 2 "$W"/logs/final_*.log | tee -a "$OUT/summary.txt"
