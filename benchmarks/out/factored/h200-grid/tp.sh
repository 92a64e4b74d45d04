T0=$(date +%s); DL=${DL:-135}
# Run from the repository root on the device; .dev/ held copies of ../shared/data/cifar10-jpeg.tar.gz,
# ../shared/models/resnet56-cifar10jpeg.th, resnet56-4bfd9763.th and the torch-pruning 1.6.1 wheel.
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 CAPROJ_CACHE=/tmp/cache OMP_NUM_THREADS=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl
G=/tmp/t; mkdir -p $G/logs
python3 -c "from caproj.data import load_data; load_data('.dev/cifar10-jpeg.tar.gz')"
J="--arch resnet56 --weights .dev/resnet56-cifar10jpeg.th --data .dev/cifar10-jpeg.tar.gz --no-latency --threads 1 --device cuda --lr 0.02 --finetune-epochs 3 --equal-compute --budget-images 226560 --methods tp-l2 --targets 0.5"
for s in 0 1 2; do python3 -c "from caproj.cli import main; main()" bench $J --seeds $s --out-dir $G/s$s > $G/logs/s$s.log 2>&1 & done
while [ -n "$(jobs -rp)" ] && [ $(( $(date +%s) - T0 )) -lt $DL ]; do sleep 2; done
echo "stopped at $(( $(date +%s) - T0 )) s"; kill $(jobs -rp) 2>/dev/null
tar czf $OUT/tp.tgz -C $G .; tail -n 4 $G/logs/*.log
