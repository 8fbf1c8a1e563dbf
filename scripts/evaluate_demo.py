"""Measure the demo model's quality: recognition of generated images and reconstruction PSNR.

    python scripts/evaluate_demo.py [BUNDLE]       (default: the demo bundle shipped in maskbit_runtime)
"""

import json
import sys
from pathlib import Path

from maskbit.evaluation.demo import evaluate_bundle
from maskbit_runtime.cli import DEMO_BUNDLE

bundle = Path(sys.argv[1]) if len(sys.argv) > 1 else DEMO_BUNDLE
report = evaluate_bundle(bundle, samples_per_class=16, seeds=(0, 1, 2), held_out_per_class=32)
print(json.dumps(report, indent=2))
