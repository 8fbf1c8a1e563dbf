"""`maskbit_runtime` never imports torch or onnx."""

import subprocess
import sys


def test_importing_the_runtime_loads_neither_torch_nor_onnx():
    code = ("import sys, maskbit_runtime, maskbit_runtime.schedules, maskbit_runtime.noise, maskbit_runtime.scheduler, "
            "maskbit_runtime.generation, maskbit_runtime.tokens\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx'))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
