#!/usr/bin/env bash
# Retrain the demo model shipped with the package, exactly as it was trained, on CPU (2 cores: ~3.5 hours).
#   bash scripts/train_demo.sh [WORKDIR]        (needs: pip install -e ".[export,train]")
# Writes the trained weights to maskbit/demo/ and the verified bundle to runtime/demo/bundle/.
# The perceptual loss is off (weight 0): its ResNet-50 ImageNet weights cannot be downloaded here.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$repo/.demo_work}"
mkdir -p "$work"

python -m maskbit.demo_data "$work/data" --images-per-class 512 --seed 0     # tokenizer training crops
python -m maskbit.demo_data "$work/data1024" --images-per-class 1024 --seed 0  # generator: the same 512 and 512 more
python -m maskbit.demo_data "$work/eval" --images-per-class 8 --seed 1       # evaluation crops (held out)

# the tokenizer (unchanged since the first demo; ~25 min)
maskbit-train tokenizer --config demo64 --data "$work/data" --eval-data "$work/eval" \
    --output-dir "$work/tokenizer" --max-steps 1500 --batch-size 8 --log-every 50 --eval-every 500 \
    --save-every 500 --seed 0 --threads 1 --quiet \
    losses.perceptual_weight=0 discriminator.hidden_channels=32 losses.discriminator_start=1000 \
    optimizer.params.learning_rate=1e-3 optimizer.params.discriminator_learning_rate=1e-3 \
    lr_scheduler.params.warmup_steps=50

# the generator: no extra random crop, so it learns the crops as they are. It was trained in two runs: 2500 steps
# (~80 min with 2 threads), then resumed to 5000 (~90 min); the resumed run follows the learning-rate schedule of
# 5000 steps from step 2500 on, so a single 5000-step run would not give the same weights.
generator_run() {
    maskbit-train generator --config demo64 --data "$work/data1024" --eval-data "$work/eval" \
        --tokenizer "$work/tokenizer/tokenizer.safetensors" --output-dir "$work/generator" --batch-size 32 \
        --log-every 50 --eval-every 500 --save-every 500 --seed 0 --threads 2 --quiet "$@" \
        dataset.preprocessing.use_random_crop=false optimizer.params.learning_rate=1e-3 \
        lr_scheduler.params.warmup_steps=100
}
generator_run --max-steps 2500
generator_run --max-steps 5000 --resume

# the shipped artifacts: EMA weights, and the verified ONNX bundle with the class names
mkdir -p "$repo/maskbit/demo"
cp "$work/tokenizer/tokenizer.safetensors" "$repo/maskbit/demo/tokenizer.safetensors"
cp "$work/generator/generator.safetensors" "$repo/maskbit/demo/generator.safetensors"
# store the demo64 preset's sampling defaults with the weights; they were chosen on validation seed 100 by
#   python scripts/tune_demo_sampling.py <bundle exported from these weights>
python -c "import maskbit, sys; p = sys.argv[1]; g = maskbit.load_generator(p, 'demo64'); \
maskbit.save_generator(g, p, maskbit.get_preset('demo64'))" "$repo/maskbit/demo/generator.safetensors"
maskbit-export build-engines --tokenizer "$repo/maskbit/demo/tokenizer.safetensors" \
    --generator "$repo/maskbit/demo/generator.safetensors" --config demo64 --max-batch 8 --force \
    --class-names astronaut,chelsea,coffee,rocket,hubble_deep_field,immunohistochemistry,retina,stereo_motorcycle \
    --out "$repo/runtime/demo/bundle"
maskbit-eval demo --bundle "$repo/runtime/demo/bundle" --per-class 16 --seed 0
