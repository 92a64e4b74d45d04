#!/bin/bash
# Run from the repository root on the device; .dev/ held copies of ../shared/data/cifar10-jpeg.tar.gz,
# ../shared/models/resnet56-cifar10jpeg.th, resnet56-4bfd9763.th and the torch-pruning 1.6.1 wheel.
# Issue 36 grid on the device: one caproj bench process per cell group, all at once, 1 thread each;
# hard deadline DL seconds, then whatever finished is packed into $OUT/grid.tgz.
DL=${DL:-500}
T0=$(date +%s)
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 CAPROJ_CACHE=/tmp/cache OMP_NUM_THREADS=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl || echo "wheel install failed"
G=/tmp/g; mkdir -p $G/logs
nvidia-smi --query-gpu=name,memory.used --format=csv > $G/logs/gpu.txt 2>&1
python3 -c "import torch,torch_pruning;print(torch.__version__,torch.cuda.is_available())" > $G/logs/env.txt 2>&1
python3 -c "from caproj.data import load_data; load_data('.dev/cifar10-jpeg.tar.gz')" > $G/logs/decode.txt 2>&1
echo "decoded at $(( $(date +%s) - T0 )) s" >> $G/logs/env.txt
J="--arch resnet56 --weights .dev/resnet56-cifar10jpeg.th --data .dev/cifar10-jpeg.tar.gz --no-latency --threads 1 --device cuda --lr 0.02"
P="--arch resnet56 --weights .dev/resnet56-4bfd9763.th --data .dev/cifar10-jpeg.tar.gz --no-latency --threads 1 --device cuda --lr 0.02 --kd 0 --targets 0.5"
EQ="--finetune-epochs 3 --equal-compute --budget-images 226560"
FAC="cp:factored:factored-ramp=0.1:ridge-to=projected:ridge=0.1"
cell() { name=$1; shift; python3 -c "from caproj.cli import main; main()" bench "$@" --out-dir $G/$name > $G/logs/$name.log 2>&1 & }
( sleep 120; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> $G/logs/gpu.txt 2>&1 ) &
cell r56-15ep-fac-0.5      $J --methods $FAC --targets 0.5 --seeds 0 --finetune-epochs 15 --equal-compute --budget-images 825600
cell r56-resrep-0.5        $J $EQ --methods resrep --targets 0.5 --seeds 0
cell r56-resrep-0.25       $J $EQ --methods resrep --targets 0.25 --seeds 0
cell r56-resrep-0.125      $J $EQ --methods resrep --targets 0.125 --seeds 0
cell r56-fac-0.5-s0        $J $EQ --methods $FAC --targets 0.5 --seeds 0
cell r56-fac-0.25-s1       $J $EQ --methods $FAC --targets 0.25 --seeds 1
cell r56-fac-0.25-s2       $J $EQ --methods $FAC --targets 0.25 --seeds 2
cell r56-fac-0.125-s0      $J $EQ --methods $FAC --targets 0.125 --seeds 0
cell r56png-3ep-s2         $P --methods cp:match-scale,tp-l2 --finetune-epochs 3 --seeds 2
cell r56png-1ep-s12        $P --methods cp:match-scale,tp-l2 --finetune-epochs 1 --seeds 1,2
cell r56-fac-0.5-s1        $J $EQ --methods $FAC --targets 0.5 --seeds 1
cell r56-fac-0.5-s2        $J $EQ --methods $FAC --targets 0.5 --seeds 2
while [ -n "$(jobs -rp)" ] && [ $(( $(date +%s) - T0 )) -lt $DL ]; do sleep 5; done
echo "stopped at $(( $(date +%s) - T0 )) s; still running: $(jobs -rp | wc -l)" >> $G/logs/env.txt
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv >> $G/logs/gpu.txt 2>&1
kill $(jobs -rp) 2>/dev/null
(sleep 1) && tar czf $OUT/grid.tgz -C $G .
cat $G/logs/env.txt; tail -n 3 $G/logs/*.log
