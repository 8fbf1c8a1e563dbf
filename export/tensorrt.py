"""TensorRT engines for a bundle: one plan per component, built from its ONNX file with the manifest's profile.

`build_engines(bundle)` parses every component's ONNX file (`parse_from_file`, so external weight data next to
it is found), builds a plan with one optimization profile from the manifest's batch profile and writes
`<component>.engine` next to it. The manifest entries gain `engine`, `engine_sha256`, `engine_precision`,
`tensorrt_version` and `gpu` (name and compute capability), which the runtime checks before loading.

Failure leaves the bundle as it was: plans go to temporary files and replace nothing until every component
has built. A bundle that already lists engines is first rewritten without them (a valid ONNX-only bundle),
then the engine files are swapped in and the new manifest is written, so an interruption at any point leaves
either the ONNX-only bundle or the complete new one, never a manifest whose hashes do not match its files.

Networks are strongly typed (TensorRT 10 with the STRONGLY_TYPED flag; TensorRT 11 builds nothing else): every
layer computes in the types its ONNX graph declares, so an engine's precision is the precision its graphs were
exported in (`--precision`, cast.py), the same on TensorRT 10 and 11. "fp32" also clears TF32, so matrix products
really run in float32 like the ONNX graphs the runtime is verified against; "tf32" keeps TensorRT's TF32 matrix
products (float32 storage, 10-bit mantissa products: several times faster on Ampere and later). "fp16"/"bf16" need a
bundle exported with that `--precision`: its generator graphs compute in fp16/bf16 with float32 LayerNorms and
float32 logits, guidance and sampler; the tokenizer's graphs stay float32 and are built with TF32 (recorded as
"tf32"). Sampling decisions of reduced-precision engines are not expected to match the eager sampler token for
token; the distribution gate (quality.py) judges them.

Timing cache: kernel timings are kept in `tensorrt.timing-cache` beside the manifest and reused by the next build
in that bundle (TensorRT checks that the cache is from the same GPU and version; a mismatched or corrupt cache is
replaced, never trusted).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from maskbit_runtime.backends.cuda import gpu_info
from maskbit_runtime.backends.tensorrt import collecting_logger, import_tensorrt
from maskbit_runtime.manifest import BatchProfile, Manifest, sha256_file
from maskbit_runtime.errors import InputError, MaskbitError
from maskbit_runtime.files import StagedFiles, atomic_write_bytes, remove_temporaries, writer_lock
from maskbit_runtime.specs import ComponentSpec, Dims

from .graphs import GENERATOR_COMPONENTS

PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
TIMING_CACHE = "tensorrt.timing-cache"
# the methods this module and the runtime backend call on TensorRT's objects; tests/test_tensorrt_build.py checks
# them, and every `trt.<name>` chain in both files, against the installed package (TensorRT 11 removed some of 10's)
TENSORRT_METHODS = ("Builder.create_network", "Builder.create_builder_config", "Builder.create_optimization_profile",
                    "Builder.build_serialized_network", "OnnxParser.parse_from_file", "OnnxParser.get_error",
                    "IBuilderConfig.set_memory_pool_limit", "IBuilderConfig.add_optimization_profile",
                    "IBuilderConfig.clear_flag", "IBuilderConfig.set_flag", "IBuilderConfig.create_timing_cache",
                    "IBuilderConfig.set_timing_cache", "ITimingCache.serialize", "IOptimizationProfile.set_shape",
                    "INetworkDefinition.get_input", "Runtime.deserialize_cuda_engine",
                    "ICudaEngine.create_execution_context", "ICudaEngine.get_tensor_name",
                    "ICudaEngine.get_tensor_dtype", "ICudaEngine.is_shape_inference_io",
                    "IExecutionContext.set_input_shape", "IExecutionContext.get_tensor_shape",
                    "IExecutionContext.set_tensor_address", "IExecutionContext.execute_async_v3")
ENGINE_KEYS = ("engine", "engine_sha256", "engine_precision", "tensorrt_version", "gpu")


class EngineBuildError(MaskbitError, RuntimeError):
    """TensorRT could not parse or build a component."""


def network_flags(trt) -> int:
    """Strongly typed: TensorRT 10 needs the flag; TensorRT 11 is always strongly typed and ignores it."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def graph_precision(engine_precision: str) -> str:
    """The precision of the generator graphs a strongly typed engine of `engine_precision` is built from (it computes
    in its graphs' types): fp16 / bf16 engines from fp16 / bf16 graphs, fp32 and tf32 engines from fp32 graphs.
    The one statement of this rule: the export job checks options with it, `component_precisions` a bundle."""
    if engine_precision not in PRECISIONS:
        raise InputError(f"engine precision {engine_precision!r} is not supported; expected one of "
                         f"{', '.join(PRECISIONS)}")
    return engine_precision if engine_precision in ("fp16", "bf16") else "fp32"


def component_precisions(manifest: Manifest, precision: str) -> dict[str, str]:
    """The engine precision of every component for a build at `precision`, after checking that the bundle's graphs
    carry it (a strongly typed engine computes in its graph's types); InputError, naming the fix, otherwise."""
    wanted, out = graph_precision(precision), {}
    reduced = wanted != "fp32"
    for name, entry in manifest.components.items():
        carries = name in GENERATOR_COMPONENTS
        needed = wanted if carries else "fp32"
        if entry.precision != needed:
            how = (f"export the bundle with --precision {needed}" if entry.precision != "int8" else
                   "int8 graphs hold ONNX Runtime's quantization operators, which TensorRT cannot parse; export "
                   f"with --precision {needed}")
            raise InputError(f"--engine-precision {precision} needs {needed} {name} graphs, but this bundle's are "
                             f"{entry.precision}: {how}")
        out[name] = precision if carries or not reduced else "tf32"
    return out


def _profile_shapes(spec: ComponentSpec, dims: Dims, batch_profile: BatchProfile) -> dict[str, tuple]:
    """(min, opt, max) shapes of every input with a batch axis; scalar inputs need no profile entry."""
    return {t.name: tuple(dims.resolve(t.shape, b) for b in (batch_profile.min, batch_profile.opt, batch_profile.max))
            for t in spec.inputs if t.dynamic_axes}


def _build_plan(trt, builder, logger, onnx_path: Path, spec: ComponentSpec, dims: Dims, batch_profile: BatchProfile,
                precision: str, workspace_gb: float, timing_cache=None):
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path.name}: "
                               f"{'; '.join(errors) or _last(logger)}")
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    missing = [t.name for t in spec.inputs if t.name not in inputs]
    if missing:
        raise EngineBuildError(f"{onnx_path.name} has no input(s) {', '.join(missing)} after parsing")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if timing_cache is not None:
        config.set_timing_cache(timing_cache, False)
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    else:                          # tf32, and the float32 parts of fp16/bf16 graphs; their types do the rest
        config.set_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in _profile_shapes(spec, dims, batch_profile).items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"TensorRT could not build an engine for {spec.name}: {_last(logger)}")
    return plan


def build_engines(bundle_dir: str | Path, precision: str = "fp32", workspace_gb: float = 4,
                  on_progress: Callable[[str], None] | None = None) -> Manifest:
    """Build a TensorRT engine for every component of the bundle at `bundle_dir`; returns the updated manifest.
    Holds the bundle's writer lock (the one `maskbit-export` takes), and removes what a killed build left."""
    with writer_lock(bundle_dir, f"another export is writing {bundle_dir} right now; wait for it"):
        for name in [f"{c}.engine" for c in Manifest.load(bundle_dir).components] + [TIMING_CACHE]:
            remove_temporaries(Path(bundle_dir) / name)
        return _build_engines(bundle_dir, precision, workspace_gb, on_progress)


def _build_engines(bundle_dir: str | Path, precision: str, workspace_gb: float,
                   on_progress: Callable[[str], None] | None) -> Manifest:
    progress = on_progress or (lambda message: None)
    manifest = Manifest.load(bundle_dir)
    precisions = component_precisions(manifest, precision)
    trt = import_tensorrt()
    gpu = gpu_info(0)
    logger = collecting_logger(trt)
    builder = trt.Builder(logger)
    root = manifest.root
    plans: dict[str, Path] = {}
    cache = _load_timing_cache(trt, builder, root / TIMING_CACHE, progress)
    with StagedFiles() as staged:
        for name, entry in manifest.components.items():
            progress(f"building TensorRT engine {name} ({precisions[name]})")
            plan = _build_plan(trt, builder, logger, manifest.file(name), manifest.spec(name), manifest.dims,
                               entry.batch_profile, precisions[name], workspace_gb, cache)
            plans[name] = root / f"{name}.engine"
            staged.path(plans[name]).write_bytes(plan)
        components = {name: dataclasses.replace(entry, **dict.fromkeys(ENGINE_KEYS))
                      for name, entry in manifest.components.items()}
        if any(entry.engine for entry in manifest.components.values()):
            manifest.replace(components=components).write(root)   # ONNX-only while the engine files are swapped
        for name, path in plans.items():
            staged.commit(path)
            components[name] = dataclasses.replace(
                components[name], engine=path.name, engine_sha256=sha256_file(path), engine_precision=precisions[name],
                tensorrt_version=trt.__version__, gpu={k: str(gpu[k]) for k in ("name", "compute_capability")})
        manifest.replace(components=components).write(root)
        atomic_write_bytes(root / TIMING_CACHE, bytes(memoryview(cache.serialize())))
    progress(f"wrote {len(plans)} TensorRT engines for {gpu['name']} (TensorRT {trt.__version__})")
    return Manifest.load(root)


def _load_timing_cache(trt, builder, path: Path, progress: Callable[[str], None]):
    """The bundle's timing cache, or a new empty one when there is none or TensorRT cannot use it."""
    config = builder.create_builder_config()
    data = b""
    if path.is_file() and not path.is_symlink():
        data = path.read_bytes()
    cache = config.create_timing_cache(data)
    if data and cache is None:
        progress(f"ignoring {path.name}: TensorRT {trt.__version__} cannot read it; timing from scratch")
        cache = config.create_timing_cache(b"")
    if cache is None:
        raise EngineBuildError(f"TensorRT {trt.__version__} could not create a timing cache")
    if data and not config.set_timing_cache(cache, False):    # from another GPU or TensorRT version
        progress(f"ignoring {path.name}: it was written for another GPU or TensorRT version; timing from scratch")
        cache = config.create_timing_cache(b"")
    return cache


def _parser_error(error) -> str:
    desc = error.desc() if hasattr(error, "desc") else str(error)
    node = error.node() if hasattr(error, "node") else -1
    return f"node {node}: {desc}" if node is not None and node >= 0 else str(desc)


def _last(logger) -> str:
    return logger.errors[-1] if logger.errors else "no error message from TensorRT"
