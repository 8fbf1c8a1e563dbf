#!/usr/bin/env bash
# The GPU suite, in parts, most valuable first, for the lent H200 (600 s per command, 15 minutes a session with
# the machine's start, no network; see scripts/h200_packages.txt for what its image holds):
#   scripts/gpu_suite.sh                       every part in order, each under its own time budget
#   scripts/gpu_suite.sh --part throughput     one part (repeat --part for several); on the lent machine run each
#                                              part as its own command, so no part can eat another's minutes
#   scripts/gpu_suite.sh --dry-run [--part P]  the rehearsal: every dependency check and every module each part
#                                              imports, nothing run (tests/test_gpu_suite_rehearsal.py, in CI)
#   scripts/gpu_suite.sh --part tests -- -x    arguments after -- go to pytest (the tests part)
#
# part        budget  estimate (first run on a fresh machine)  what
# smoke        150 s  ~40 s     (a) versions, nvidia-smi, one eager CUDA generation equal to the CPU's
# throughput   570 s  ~6-9 min  (b) 14-bit size, batch 64, 64 steps: eager fp32, TF32, bf16, then AOTInductor bf16
#                               with CUDA graphs: images/s, ms/step, decoder ms, peak memory, host syncs
# serving       30 s  ~0 s      (c) step-level serving scheduler on CUDA: a hook; no CUDA case is written yet
# tests        480 s  ~3-4 min  (d) the GPU test tier (tests marked gpu/tensorrt), one pytest session
# training     420 s  ~3-4 min  (e) benchmarks/gpu_training.py: checks against the CPU, resume, torchrun, throughput
# How estimated (nothing here has run on a GPU yet): (a) imports and CUDA start, seconds of tiny compute; (b) about
# 21 TFLOP per guided step (302M-parameter transformer, 256 tokens, 128 rows) at assumed H200 rates of ~50 TFLOP/s
# fp32, ~300 TF32, ~500 bf16 (the workplace measured 770-800 TFLOP/s on a bf16 8192^3 matmul), so eager fp32 takes
# ~27 s per 64-step generation and is run twice (timed, then counted) after a 2-step warm-up, ~1 min in all; then
# the AOTInductor case exports the full model to ONNX (~1-2 min, only for the bundle's manifest) and compiles five
# bf16 packages (~3-5 min, scaled from ~20 s per tiny package on 2 CPU cores here, Triton on 16 cores there);
# (d) five tiny CUDA packages compiled once (~1.5 min) plus ~40 tests of seconds each; (e) the README's ~2 min for
# the checks plus six full-size throughput cases of ~15 s each. So the whole suite (~14-18 min) does NOT fit one
# 15-minute session: run smoke and throughput first; a rerun of throughput on the same warm machine resumes the
# AOTInductor bundle from the cache (each package is written as soon as it is compiled) and skips what is done.
# Measured durations replace these once a machine has been lent (they are printed per part, and in $OUT).
#
# Results go to $OUT after every case: gpu_smoke.json, gpu_throughput.json, gpu_serving.json, gpu_training.json
# (each rewritten after every case), tests.log and tests.xml, <part>.log, and gpu_suite_parts.txt (part, exit status,
# seconds: 124 means the budget ran out). The package becomes importable offline first: pip install --no-deps
# --no-build-isolation -e . , or, when that cannot work (no setuptools, read-only site-packages) or
# MASKBIT_GPU_SUITE_SHIM=1, a PYTHONPATH shim (maskbit_export -> export/, maskbit_runtime -> runtime/, the command
# lines on PATH). Settings: MASKBIT_GPU_STEPS / MASKBIT_GPU_BATCH (64 / 64), MASKBIT_GPU_CASES (all four),
# MASKBIT_GPU_CACHE (compiled packages, default ${TMPDIR:-/tmp}/maskbit-gpu-suite), MASKBIT_GPU_SUITE_NEED (more
# modules the dependency check requires: the rehearsal's control), MASKBIT_GPU_SUITE_ALLOW_SKIPS=1 (a GPU run in
# which every GPU test or a training case skipped passes), MASKBIT_WHEELS (a folder of wheels to install from).
# Exit status: 0 when every part passed; else the first failing part's (4: a module is missing, 3: everything
# skipped on a GPU, 124: out of time). Without a GPU the GPU-bound parts say so and the test tier skips with reasons.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd -P)"
SELF="$ROOT/scripts/gpu_suite.sh"
PYTHON="${PYTHON:-python3}"
ALL_PARTS=(smoke throughput serving tests training)
declare -A BUDGET=([smoke]=150 [throughput]=570 [serving]=30 [tests]=480 [training]=420)
declare -A NEEDS=(
    [smoke]="numpy torch maskbit maskbit_runtime"
    [throughput]="numpy torch onnx onnxscript maskbit maskbit_export maskbit_runtime"
    [serving]="maskbit_runtime"
    [tests]="pytest numpy torch click PIL safetensors tqdm onnx onnxscript onnxruntime maskbit maskbit_export maskbit_runtime"
    [training]="numpy torch torchvision PIL safetensors maskbit"
)
CACHE="${MASKBIT_GPU_CACHE:-${TMPDIR:-/tmp}/maskbit-gpu-suite}"
export MASKBIT_AOTI_CACHE="$CACHE/aoti"          # the test tier's CUDA packages (tests/aoti_cuda.py)
# only the files that hold GPU tests are collected: a missing optional library elsewhere cannot stop the run
mapfile -t TEST_FILES < <(grep -lE "mark\.(gpu|tensorrt)" tests/test_*.py)
# the training part runs these checks itself (at 24 steps); the tier does not repeat them
TEST_DESELECT=(--deselect tests/test_train_devices.py::test_gpu_training_checks_pass_on_cuda)

gpu() { "$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0; }

# ---- the parts: each runs in its own process under `timeout` (see run_part) -------------------------------------

part_smoke() {
    if [[ "$DRY" == 1 ]]; then "$PYTHON" benchmarks/gpu_smoke.py --dry-run; return; fi
    echo "== nvidia-smi"
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi || echo "nvidia-smi failed"; else echo "no nvidia-smi"; fi
    local status=0
    "$PYTHON" benchmarks/gpu_smoke.py ${OUT:+--out "$OUT"} || status=$?
    if [[ $status == 2 ]]; then echo "smoke: PyTorch sees no CUDA GPU: versions only"; return 0; fi
    return "$status"
}

part_throughput() {
    local args=(--size full --batch "${MASKBIT_GPU_BATCH:-64}" --steps "${MASKBIT_GPU_STEPS:-64}" --rounds 1
                --cache "$CACHE/throughput" ${MASKBIT_GPU_CASES:+--cases "$MASKBIT_GPU_CASES"} ${OUT:+--out "$OUT"})
    if [[ "$DRY" == 1 ]]; then "$PYTHON" benchmarks/gpu_throughput.py "${args[@]}" --dry-run; return; fi
    if [[ "$(gpu)" != 1 ]]; then echo "throughput: skipped: PyTorch sees no CUDA GPU"; return; fi
    "$PYTHON" benchmarks/gpu_throughput.py "${args[@]}"
}

part_serving() {
    # HOOK(serving scheduler): the slot scheduler exists (runtime/scheduler.py; CPU figures from
    # benchmarks/serve_load.py and benchmarks/scheduler_choices.py), but no CUDA case is written. Put its CUDA
    # throughput (the AOTInductor backend) here as benchmarks/gpu_serving.py (images/s at batch 64 and 64 steps with
    # requests arriving over time, against one request at a time; JSON to $OUT/gpu_serving.json, rewritten after
    # every case; --dry-run imports only) and add its modules to NEEDS[serving].
    if [[ -f benchmarks/gpu_serving.py ]]; then
        "$PYTHON" benchmarks/gpu_serving.py ${OUT:+--out "$OUT"} $([[ "$DRY" == 1 ]] && echo --dry-run)
        return
    fi
    local line="no CUDA case of the slot scheduler is written yet: nothing to measure (hook in scripts/gpu_suite.sh)"
    echo "serving: $line"
    if [[ -n "${OUT:-}" && "$DRY" != 1 ]]; then
        printf '{"status": "not implemented", "reason": "%s"}\n' "$line" >"$OUT/gpu_serving.json"
    fi
}

part_tests() {
    local common=(-p no:cacheprovider -m "gpu or tensorrt" "${TEST_DESELECT[@]}" "${TEST_FILES[@]}")
    if [[ "$DRY" == 1 ]]; then "$PYTHON" -m pytest "${common[@]}" --collect-only -q "${PYTEST_ARGS[@]}"; return; fi
    local report="${OUT:-$(mktemp -d)}/tests.xml"
    local status=0
    "$PYTHON" -m pytest "${common[@]}" -v -rs --junitxml="$report" "${PYTEST_ARGS[@]}" || status=$?
    if [[ $status -ne 0 && $status -ne 5 ]]; then return "$status"; fi          # 5: nothing selected
    passed="$("$PYTHON" - "$report" <<'EOF'
import sys
import xml.etree.ElementTree as ET
suites = ET.parse(sys.argv[1]).getroot().iter("testsuite")
print(sum(int(s.get("tests", 0)) - int(s.get("skipped", 0)) - int(s.get("failures", 0)) - int(s.get("errors", 0))
          for s in suites))
EOF
)"
    echo "tests: $passed GPU tests passed"
    if [[ "$(gpu)" == 1 && "$passed" == 0 && "${MASKBIT_GPU_SUITE_ALLOW_SKIPS:-0}" != 1 ]]; then
        echo "tests: a GPU is present but every GPU test was skipped (reasons above);" \
             "MASKBIT_GPU_SUITE_ALLOW_SKIPS=1 accepts that" >&2
        return 3
    fi
}

part_training() {
    if [[ "$DRY" == 1 ]]; then "$PYTHON" benchmarks/gpu_training.py --device cuda --size full --dry-run; return; fi
    if [[ "$(gpu)" != 1 ]]; then
        echo "training: no CUDA GPU: every case skips, with the reason"
        "$PYTHON" benchmarks/gpu_training.py --device cuda --size full ${OUT:+--out "$OUT"}
        return
    fi
    local fail_on_skip=--fail-on-skip                 # on a GPU, a training case that cannot run is a broken stack
    if [[ "${MASKBIT_GPU_SUITE_ALLOW_SKIPS:-0}" == 1 ]]; then fail_on_skip=""; fi
    "$PYTHON" benchmarks/gpu_training.py --device cuda --size full $fail_on_skip ${OUT:+--out "$OUT"}
}

# ---- setup: arguments, the offline install, the dependency check -------------------------------------------------

parse() {
    DRY=0 INNER="" PARTS=() PYTEST_ARGS=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --dry-run) DRY=1 ;;
            --part) PARTS+=("${2:?--part needs a name: ${ALL_PARTS[*]}}"); shift ;;
            --inner) INNER="$2"; shift ;;
            --) shift; PYTEST_ARGS=("$@"); break ;;
            *) echo "gpu_suite: unknown argument $1 (parts: ${ALL_PARTS[*]}; --dry-run; -- pytest arguments)" >&2
               exit 2 ;;
        esac
        shift
    done
    [[ ${#PARTS[@]} -gt 0 ]] || PARTS=("${ALL_PARTS[@]}")
    for part in "${PARTS[@]}"; do
        [[ -n "${BUDGET[$part]:-}" ]] || { echo "gpu_suite: unknown part $part (${ALL_PARTS[*]})" >&2; exit 2; }
    done
}

install() {
    if [[ -n "${MASKBIT_WHEELS:-}" ]]; then
        "$PYTHON" -m pip install --no-index --find-links "$MASKBIT_WHEELS" pytest click pillow tqdm safetensors onnx \
            onnxscript || echo "some wheels were not in $MASKBIT_WHEELS; continuing with what is installed"
    fi
    local installed
    installed="$("$PYTHON" -c 'import maskbit_runtime, maskbit_export, os; print(os.path.realpath(maskbit_runtime.__file__))' \
        2>/dev/null || true)"
    if [[ "$installed" == "$ROOT/runtime/__init__.py" && "${MASKBIT_GPU_SUITE_SHIM:-0}" != 1 ]]; then
        echo "install: maskbit is already importable from this checkout"
        return
    fi
    pip_log="$(mktemp)"
    if [[ "${MASKBIT_GPU_SUITE_SHIM:-0}" != 1 ]] \
        && "$PYTHON" -m pip install --no-deps --no-build-isolation -e . >"$pip_log" 2>&1; then
        echo "install: editable (pip install --no-deps --no-build-isolation -e .)"
        return
    fi
    echo "install: PYTHONPATH shim (MASKBIT_GPU_SUITE_SHIM=1, or pip said: $(tail -n 1 "$pip_log"))"
    SHIM="$(mktemp -d)"
    mkdir -p "$SHIM/lib" "$SHIM/bin"
    ln -s "$ROOT/maskbit" "$SHIM/lib/maskbit"
    ln -s "$ROOT/export" "$SHIM/lib/maskbit_export"
    ln -s "$ROOT/runtime" "$SHIM/lib/maskbit_runtime"
    # the runtime finds the AOTInductor backend through its entry point (it never imports maskbit_export), so the
    # shim carries the distribution's metadata with the entry points pyproject.toml declares
    mkdir -p "$SHIM/lib/maskbit-0+shim.dist-info"
    printf 'Metadata-Version: 2.1\nName: maskbit\nVersion: 0+shim\n' >"$SHIM/lib/maskbit-0+shim.dist-info/METADATA"
    "$PYTHON" - "$ROOT/pyproject.toml" >"$SHIM/lib/maskbit-0+shim.dist-info/entry_points.txt" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for group, entries in project.get("entry-points", {}).items():
    print(f"[{group}]")
    print("".join(f"{name} = {target}\n" for name, target in entries.items()))
PY
    for pair in maskbit-run:maskbit_runtime.cli maskbit-export:maskbit_export.cli maskbit-train:maskbit.train.cli \
                maskbit-eval:maskbit.evaluation.cli; do
        printf '#!/bin/sh\nexec "%s" -c "import sys; from %s import main; sys.argv[0] = \\"%s\\"; main()" "$@"\n' \
            "$(command -v "$PYTHON")" "${pair#*:}" "${pair%%:*}" >"$SHIM/bin/${pair%%:*}"
        chmod +x "$SHIM/bin/${pair%%:*}"
    done
    export PYTHONPATH="$SHIM/lib${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$SHIM/bin:$PATH"
}

# Imports every module the chosen parts need (not just finds it: a broken install fails here too); prints
# "module: why" for each one that cannot be imported.
missing_modules() {
    local needs=""
    for part in "${PARTS[@]}"; do needs+=" ${NEEDS[$part]}"; done
    "$PYTHON" - $needs ${MASKBIT_GPU_SUITE_NEED:-} <<'EOF'
import importlib
import importlib.util
import sys
import warnings

warnings.simplefilter("ignore")
for name in dict.fromkeys(sys.argv[1:]):
    try:
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}")
        importlib.import_module(name)
    except Exception as exc:  # a missing or broken module: say which and why
        print(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
try:  # the runtime finds the AOTInductor backend by its entry point, which the install (or shim) must carry
    from maskbit_runtime.backends import _registered
    _registered("aoti")
except Exception as exc:
    print(f"the aoti backend entry point: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
EOF
}

run_part() {
    local part="$1" start status=0
    start=$(date +%s)
    echo "== part $part (budget ${BUDGET[$part]} s)$([[ "$DRY" == 1 ]] && echo ', dry run')"
    local command=(timeout -k 15 "${BUDGET[$part]}" bash "$SELF" --inner "$part")
    [[ "$DRY" == 1 ]] && command+=(--dry-run)
    [[ ${#PYTEST_ARGS[@]} -gt 0 ]] && command+=(-- "${PYTEST_ARGS[@]}")
    if [[ -n "${OUT:-}" ]]; then
        "${command[@]}" 2>&1 | tee "$OUT/$part.log" || status=$?
    else
        "${command[@]}" || status=$?
    fi
    local seconds=$(( $(date +%s) - start ))
    echo "== part $part: exit $status after $seconds s$([[ $status == 124 ]] && echo ' (out of time)')"
    [[ -n "${OUT:-}" ]] && echo "$part $status $seconds" >>"$OUT/gpu_suite_parts.txt"
    return "$status"
}

main() {
    parse "$@"
    if [[ -n "$INNER" ]]; then "part_$INNER"; return; fi
    SHIM="" pip_log=""
    trap 'for p in "$SHIM" "$pip_log"; do [[ -n "$p" ]] && rm -rf "$p"; done; true' EXIT
    [[ -n "${OUT:-}" ]] && mkdir -p "$OUT"
    mkdir -p "$CACHE"
    echo "== install (offline)"
    install
    "$PYTHON" -c 'import maskbit_runtime; print("maskbit_runtime imports from", maskbit_runtime.__file__)' || true
    local missing
    missing="$(missing_modules)"
    if [[ -n "$missing" ]]; then
        echo "gpu_suite: these modules cannot be imported (no network here: carry their wheels and set" \
             "MASKBIT_WHEELS=<folder>):" >&2
        echo "$missing" | sed 's/^/  /' >&2
        exit 4
    fi
    echo "== dependencies: every module the parts (${PARTS[*]}) need imports"
    local first=0
    for part in "${PARTS[@]}"; do
        local status=0
        run_part "$part" || status=$?
        if [[ $first == 0 && $status != 0 ]]; then first=$status; fi
    done
    if [[ "$DRY" == 1 && $first == 0 ]]; then echo "gpu_suite: dry run: everything the parts would run is in place"; fi
    exit "$first"
}

main "$@"
