"""Image-quality evaluation (FID, KID, IS, precision/recall) for MaskBit samples; `maskbit-eval` is its CLI.

The metrics are torch-fidelity's (`pip install 'maskbit[eval]'`), over one of two feature networks:
- `inception`: torch-fidelity's port of the TensorFlow FID Inception-v3 (pool 2048 features, 1008 logits for IS).
  Weights come only from `--inception-weights FILE` or the torch hub cache
  (`$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth`); they are never downloaded.
- `demo`: the demo crop classifier (maskbit/demo/feature_network.safetensors), for the 8-class demo only.

ImageNet with the ADM protocol (Dhariwal & Nichol's guided-diffusion evaluator, used by MaskBit's paper):
50 samples per class x 1000 classes = 50,000 images at 256x256, saved as `arr_0` uint8 [50000,256,256,3] in an
.npz, scored against the reference batch `VIRTUAL_imagenet256_labeled.npz` (10,000 center-cropped training
images). With these tools:

    maskbit-run generate --bundle B --labels ... --seed 0 --out samples/       # 50 per class, 1000 classes
    maskbit-eval stats VIRTUAL_imagenet256_labeled.npz --out imagenet256_ref.npz   # once; arr_0 is recomputed
    maskbit-eval metrics --samples samples/ --reference imagenet256_ref.npz --out metrics.json

Numbers agree with the ADM evaluator (TensorFlow) only approximately: the network is a PyTorch port and images
are resized to 299 by torch-fidelity's TF1-compatible bilinear interpolation.
"""

from .evaluate import check_inputs, compute_stats, evaluate_samples, open_reference
from .features import extract, load_demo_features, load_features, load_inception
from .images import ImageSet, open_images
from .metrics import FeatureStats, frechet_distance, inception_score, kernel_distance, precision_recall

__all__ = [
    "FeatureStats",
    "ImageSet",
    "check_inputs",
    "compute_stats",
    "evaluate_samples",
    "extract",
    "frechet_distance",
    "inception_score",
    "kernel_distance",
    "load_demo_features",
    "load_features",
    "load_inception",
    "open_images",
    "open_reference",
    "precision_recall",
]
