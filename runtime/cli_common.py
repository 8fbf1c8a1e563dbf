"""What the command lines share: the error rule, the bundle/backend/batch/sampling options, opening a pipeline."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from .backends import BACKENDS
from .errors import InputError, MaskbitError
from .sampling import HELP, MAX_STEPS, SamplingSettings
from .schedules import GUIDANCE_ANNEALING, MASK_SCHEDULES, UNMASK_ORDERS

DEMO_BUNDLE = Path(__file__).parent / "demo" / "bundle"


def one_line_errors(fn):
    """The toolkit's own errors (MaskbitError) and failed file operations (OSError) become one line on stderr
    and exit status 1. Anything else is a bug and keeps its traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except (MaskbitError, OSError) as exc:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
                text = f"{exc.strerror or text}: {exc.filename}"
            raise click.ClickException(text) from None
    return wrapper


def open_pipeline(bundle: Path | None, backend: str):
    """The command's pipeline, with the native-code trust given by `--trust-native-code`/`--trusted-hashes`."""
    from .pipeline import Pipeline
    if bundle is None:
        if not (DEMO_BUNDLE / "manifest.json").is_file():
            raise InputError("no --bundle given and this installation ships no demo bundle; "
                             "build one with `maskbit-export build-engines`")
        bundle = DEMO_BUNDLE
    return Pipeline.load(bundle, backend=backend, **native_code_trust())


def native_code_trust() -> dict:
    """`trust_native_code` and `trusted_hashes` as the running command's `backend_option` flags set them (see
    `maskbit_runtime.trust`); none outside a command."""
    context = click.get_current_context(silent=True)
    meta = context.meta if context is not None else {}
    return {"trust_native_code": bool(meta.get(_TRUST)), "trusted_hashes": meta.get(_HASHES)}


def _remember(key):
    def callback(ctx, param, value):
        ctx.meta[key] = value
    return callback


_TRUST, _HASHES = "maskbit.trust_native_code", "maskbit.trusted_hashes"


def backend_option(fn):
    """--backend, and the trust that backends running native code need: --trust-native-code, --trusted-hashes
    (kept in the click context, read by `open_pipeline` and `native_code_trust`, so commands keep one parameter)."""
    fn = click.option("--trusted-hashes", type=click.Path(dir_okay=False, path_type=Path), default=None,
                      expose_value=False, callback=_remember(_HASHES),
                      help="With --backend aoti or tensorrt: a file of sha256 (one per line, kept outside the bundle) "
                           "of the packages or plans to trust; others are refused.")(fn)
    fn = click.option("--trust-native-code", is_flag=True, expose_value=False, callback=_remember(_TRUST),
                      help="Allow --backend aoti or tensorrt to load the bundle's compiled code (AOTInductor "
                           "libraries, TensorRT plans), which runs when loaded: only for bundles you trust.")(fn)
    return _backend_choice(fn)


bundle_option = click.option("--bundle", type=click.Path(path_type=Path), default=None,
                             help="Bundle directory from `maskbit-export build-engines` (default: the demo bundle).")
_backend_choice = click.option("--backend", type=click.Choice(BACKENDS), default="ort", show_default=True,
                              help="Execution backend: ONNX Runtime (CPU, or CUDA with onnxruntime-gpu), TensorRT, "
                                   "or AOTInductor packages (aoti).")
batch_option = click.option("--batch-size", type=click.IntRange(min=1), default=None,
                            help="Images per run (default and upper limit: the bundle's max batch).")


def sampling_options(fn):
    """One option per sampling setting (`--num-steps`, `--guidance-scale`, ...); unset ones keep the bundle's."""
    kinds = {"num_steps": click.IntRange(1, MAX_STEPS), "guidance_annealing": click.Choice(GUIDANCE_ANNEALING),
             "mask_schedule": click.Choice(MASK_SCHEDULES), "use_sampling_annealing": click.BOOL,
             "unmask_order": click.Choice(UNMASK_ORDERS)}
    for name in reversed(SamplingSettings.fields()):
        fn = click.option(f"--{name.replace('_', '-')}", name, type=kinds.get(name, float), default=None,
                          help=f"{HELP[name]} (default: the bundle's)")(fn)
    return fn
