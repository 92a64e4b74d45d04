#!/bin/bash
# Issue 36, session 26: Torch-Pruning's own channel ranking (group-L2 magnitude, `init=magnitude`)
# as the start of caproj's least-squares refit, three seeds, with Torch-Pruning's seeds 1-2
# on the same machine. Run from the repository root on the device; .dev/ holds
# cifar10-jpeg.tar.gz, resnet56-cifar10jpeg.th and the torch-pruning 1.6.1 wheel. One process
# per cell, 1 CPU thread each, all at once; hard deadline DL s; then $OUT/grid.tgz.
DL=${DL:-430}; T0=$(date +%s)
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 CAPROJ_CACHE=/tmp/cache OMP_NUM_THREADS=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl || echo "wheel install failed"
G=/tmp/g; mkdir -p $G/logs
python3 -c "import torch,torch_pruning;print(torch.__version__,torch.cuda.is_available())" > $G/logs/env.txt 2>&1
python3 -c "from caproj.data import load_data; load_data('.dev/cifar10-jpeg.tar.gz')" > $G/logs/decode.txt 2>&1
echo "decoded at $(( $(date +%s) - T0 )) s" >> $G/logs/env.txt
J="--arch resnet56 --weights .dev/resnet56-cifar10jpeg.th --data .dev/cifar10-jpeg.tar.gz --no-latency --threads 1 --device cuda --lr 0.02 --finetune-epochs 3 --equal-compute --budget-images 226560"
MAG="cp:init=magnitude:match-scale:ridge-to=projected:ridge=0.1"
MAGCH="cp:init=magnitude:match-scale:match-scale-by=channel:ridge-to=projected:ridge=0.1"
cell() { name=$1; shift; python3 -c "from caproj.cli import main; main()" bench $J "$@" --out-dir $G/$name > $G/logs/$name.log 2>&1 & }
for t in 0.125 0.25; do
  for s in 0 1 2; do cell mag-$t-s$s --methods $MAG --targets $t --seeds $s; done
  for s in 1 2; do cell tp-$t-s$s --methods tp-l2 --targets $t --seeds $s; done
  cell magch-$t-s0 --methods $MAGCH --targets $t --seeds 0
done
for s in 0 1 2; do cell mag-0.5-s$s --methods $MAG --targets 0.5 --seeds $s; done
while [ -n "$(jobs -rp)" ] && [ $(( $(date +%s) - T0 )) -lt $DL ]; do sleep 3; done
echo "stopped at $(( $(date +%s) - T0 )) s; still running: $(jobs -rp | wc -l)" >> $G/logs/env.txt
kill $(jobs -rp) 2>/dev/null; sleep 1
tar czf $OUT/grid.tgz -C $G .
cat $G/logs/env.txt; for f in $G/*/*-eq.json; do python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[1].split('/')[-2],d['acc_before_ft'],d['acc_after_ft'],round(d['finetune_seconds']))" $f; done
tail -n 2 $G/logs/mag-0.125-s0.log
