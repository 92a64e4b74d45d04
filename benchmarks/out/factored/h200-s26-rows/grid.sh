#!/bin/bash
# Issue 36, session 26: per-channel match_scale (the pruned form) on the equal-images protocol.
# Run from the repository root on the device; .dev/ holds ../shared/data/cifar10-jpeg.tar.gz,
# ../shared/models/resnet56-cifar10jpeg.th and the torch-pruning 1.6.1 wheel.
# Stage 1: seed 0 of every variant at once (one process per cell, 1 CPU thread each).
# Stage 2: at each target the best caproj variant of stage 1 gets seeds 1 and 2, with
# Torch-Pruning's seeds 1 and 2 beside it. Hard deadline DL s; then $OUT/grid.tgz.
DL=${DL:-480}; T0=$(date +%s)
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 CAPROJ_CACHE=/tmp/cache OMP_NUM_THREADS=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl || echo "wheel install failed"
G=/tmp/g; mkdir -p $G/logs
python3 -c "import torch,torch_pruning;print(torch.__version__,torch.cuda.is_available())" > $G/logs/env.txt 2>&1
python3 -c "from caproj.data import load_data; load_data('.dev/cifar10-jpeg.tar.gz')" > $G/logs/decode.txt 2>&1
echo "decoded at $(( $(date +%s) - T0 )) s" >> $G/logs/env.txt
J="--arch resnet56 --weights .dev/resnet56-cifar10jpeg.th --data .dev/cifar10-jpeg.tar.gz --no-latency --threads 1 --device cuda --lr 0.02 --finetune-epochs 3 --equal-compute --budget-images 226560"
DEEP="cp:match-scale:ridge-to=projected:ridge=0.1"
CH="cp:match-scale:match-scale-by=channel:ridge-to=projected:ridge=0.1"
CH1="cp:match-scale:match-scale-by=channel:ridge-to=projected:ridge=1"
SL="cp:refit=false:match-scale:match-scale-by=channel"
L1="l1:match-scale:match-scale-by=channel"
cell() { name=$1; shift; python3 -c "from caproj.cli import main; main()" bench $J "$@" --out-dir $G/$name > $G/logs/$name.log 2>&1 & }
for t in 0.25 0.125; do
  cell deep-$t-s0 --methods $DEEP --targets $t --seeds 0
  cell ch-$t-s0   --methods $CH   --targets $t --seeds 0
  cell ch1-$t-s0  --methods $CH1  --targets $t --seeds 0
  cell sl-$t-s0   --methods $SL   --targets $t --seeds 0
  cell l1-$t-s0   --methods $L1   --targets $t --seeds 0
  cell tp-$t-s0   --methods tp-l2 --targets $t --seeds 0
done
cell ch-0.5-s0 --methods $CH --targets 0.5 --seeds 0
cell sl-0.5-s0 --methods $SL --targets 0.5 --seeds 0
S1=${S1:-300}
while [ -n "$(jobs -rp)" ] && [ $(( $(date +%s) - T0 )) -lt $S1 ]; do sleep 3; done
echo "stage 1 ended at $(( $(date +%s) - T0 )) s; still running: $(jobs -rp | wc -l)" >> $G/logs/env.txt
python3 - $G > $G/logs/pick.txt <<'PY'
import glob, json, sys
g = sys.argv[1]
best = {}
for f in glob.glob(f"{g}/*-s0/*-eq.json"):
    d = json.load(open(f)); name = f.split("/")[-2].rsplit("-", 2)[0]
    t = str(d["target"]); print(t, name, d["acc_before_ft"], d["acc_after_ft"], round(d["finetune_seconds"]))
    if name in ("ch", "ch1", "sl", "l1") and (t not in best or d["acc_after_ft"] > best[t][1]):
        best[t] = (name, d["acc_after_ft"])
for t, (n, a) in sorted(best.items()):
    print("BEST", t, n, a)
PY
cat $G/logs/pick.txt
declare -A SPEC=([ch]=$CH [ch1]=$CH1 [sl]=$SL [l1]=$L1)
while read -r _ t n _; do
  for s in 1 2; do cell $n-$t-s$s --methods ${SPEC[$n]} --targets $t --seeds $s; done
  if [ "$t" != "0.5" ]; then for s in 1 2; do cell tp-$t-s$s --methods tp-l2 --targets $t --seeds $s; done; fi
done < <(grep ^BEST $G/logs/pick.txt)
while [ -n "$(jobs -rp)" ] && [ $(( $(date +%s) - T0 )) -lt $DL ]; do sleep 3; done
echo "stopped at $(( $(date +%s) - T0 )) s; still running: $(jobs -rp | wc -l)" >> $G/logs/env.txt
kill $(jobs -rp) 2>/dev/null; sleep 1
tar czf $OUT/grid.tgz -C $G .
cat $G/logs/env.txt; for f in $G/*/*-eq.json; do python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[1].split('/')[-2],d['acc_before_ft'],d['acc_after_ft'],round(d['finetune_seconds']))" $f; done
