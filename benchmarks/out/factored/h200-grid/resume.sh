export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 CAPROJ_CACHE=/tmp/cache
# Run from the repository root on the device; .dev/ held copies of ../shared/data/cifar10-jpeg.tar.gz,
# ../shared/models/resnet56-cifar10jpeg.th, resnet56-4bfd9763.th and the torch-pruning 1.6.1 wheel.
G=/tmp/g/r56-15ep-fac-0.5; mkdir -p $G; cp .dev/state/*.pt $G/
python3 -c "from caproj.cli import main; main()" bench --arch resnet56 --weights .dev/resnet56-cifar10jpeg.th --data .dev/cifar10-jpeg.tar.gz --no-latency --threads 4 --device cuda --lr 0.02 --methods cp:factored:factored-ramp=0.1:ridge-to=projected:ridge=0.1 --targets 0.5 --seeds 0 --finetune-epochs 15 --equal-compute --budget-images 825600 --out-dir $G 2>&1 | grep -v "^no state" | tail -25
rm -f $G/*.pt; cp $G/*.json $G/results.md $OUT/
