"""`maskbit-eval`: FID/KID/precision-recall/IS of samples, reference statistics, reconstruction quality, the demo
evaluation and bundle comparison. Thin: parse, call one library function, print (progress bars on stderr)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click

from maskbit_runtime.cli import DEMO_BUNDLE, one_line_errors
from maskbit_runtime.files import atomic_write_json

features_option = click.option("--features", type=click.Choice(["inception", "demo", "pixels"]), default="inception",
                               show_default=True,
                               help="Feature space: torch-fidelity's FID Inception-v3, the demo crop classifier, or "
                                    "16x16 thumbnails (small images of few scenes only).")
weights_option = click.option("--inception-weights", type=click.Path(path_type=Path), default=None,
                              help="Inception weights file (default: the torch hub cache's; never downloaded).")
batch_option = click.option("--batch-size", type=click.IntRange(min=1), default=50, show_default=True,
                            help="Images per feature-network batch.")
device_option = click.option("--device", default="cpu", show_default=True,
                             help="Torch device for the Inception network (cuda: not yet run on a GPU).")
out_option = click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the report as JSON.")


@contextlib.contextmanager
def _progress(total: int, desc: str):
    from tqdm import tqdm
    with tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False) as bar:
        yield bar.update


def _write_json(report: dict, out: Path | None) -> None:
    if out is None:
        return
    atomic_write_json(out, report, indent=2, sort_keys=False)
    click.echo(f"wrote {out}")


def _print(report: dict, indent: str = "") -> None:
    for key, value in report.items():
        if isinstance(value, dict):
            click.echo(f"{indent}{key}:")
            _print(value, indent + "  ")
        else:
            click.echo(f"{indent}{key}: {value:.6g}" if isinstance(value, float) else f"{indent}{key}: {value}")


def _demo_pipe(bundle: Path | None):
    from maskbit_runtime import Pipeline
    return Pipeline.load(bundle or DEMO_BUNDLE)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Image-quality evaluation: FID, KID, precision/recall (k=3), Inception Score, reconstruction quality."""


@main.command()
@click.option("--samples", type=click.Path(path_type=Path), required=True,
              help="Image folder or .npz with arr_0 uint8 [N,H,W,3].")
@click.option("--reference", type=click.Path(path_type=Path), required=True,
              help="Image folder, .npz with arr_0, or statistics from `maskbit-eval stats`.")
@features_option
@weights_option
@batch_option
@device_option
@out_option
@one_line_errors
def metrics(samples, reference, features, inception_weights, batch_size, device, out):
    """FID, KID, precision/recall of SAMPLES against REFERENCE (and the Inception Score with Inception)."""
    from .evaluate import check_inputs, evaluate_samples, open_reference
    from .features import load_features
    from .images import ImageSet, open_images
    sample_set, reference_set = open_images(samples), open_reference(reference)
    check_inputs(sample_set, reference_set)
    network = load_features(features, inception_weights, device)
    check_inputs(sample_set, reference_set, network)
    total = sample_set.count + (reference_set.count if isinstance(reference_set, ImageSet) else 0)
    with _progress(total, f"{features} features") as progress:
        report = evaluate_samples(sample_set, reference_set, network, batch_size, progress)
    _print(report)
    _write_json(report, out)


@main.command()
@click.argument("images", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Statistics file (.npz).")
@features_option
@weights_option
@batch_option
@click.option("--no-features", is_flag=True, help="Keep only mu and sigma (FID only; no KID or precision/recall).")
@device_option
@one_line_errors
def stats(images, out, features, inception_weights, batch_size, no_features, device):
    """Reference statistics of IMAGES (folder or .npz), reusable as `metrics --reference`."""
    from .evaluate import check_stats_input, compute_stats
    from .features import load_features
    from .images import open_images
    image_set = open_images(images)
    check_stats_input(image_set)
    if out.suffix != ".npz":
        raise click.BadParameter(f"statistics files end in .npz, got {out}", param_hint="--out")
    network = load_features(features, inception_weights, device)
    with _progress(image_set.count, f"{features} features") as progress:
        result = compute_stats(image_set, network, batch_size, progress)
    result.save(out, keep_features=not no_features)
    click.echo(f"wrote statistics of {result.count} images ({result.network}, {result.dim} features) to {out}")


@main.command()
@click.argument("images", type=click.Path(path_type=Path))
@click.option("--bundle", type=click.Path(path_type=Path), default=None, help="Bundle (default: the demo bundle).")
@click.option("--features", type=click.Choice(["auto", "inception", "demo", "pixels", "none"]), default="auto",
              show_default=True, help="rFID features; auto: demo for demo bundles, else Inception if weights exist.")
@weights_option
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@out_option
@one_line_errors
def reconstruction(images, bundle, features, inception_weights, batch_size, out):
    """PSNR, SSIM, rFID and codebook usage of the bundle tokenizer's reconstructions of IMAGES."""
    from .images import open_images
    from .reconstruction import evaluate_reconstruction, reconstruction_features
    image_set = open_images(images)
    with _demo_pipe(bundle) as pipe:
        network = reconstruction_features(features, pipe, inception_weights)
        with _progress(image_set.count, "reconstructing") as progress:
            report = evaluate_reconstruction(pipe, image_set, network, batch_size, progress)
    _print(report)
    _write_json(report, out)


@main.command()
@click.option("--bundle", type=click.Path(path_type=Path), default=None, help="A bundle of the demo classes "
              "(default: the shipped demo bundle).")
@click.option("--per-class", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--reference-per-class", type=click.IntRange(min=1), default=64, show_default=True,
              help="Held-out real crops per class in the reference set.")
@out_option
@one_line_errors
def demo(bundle, per_class, seed, reference_per_class, out):
    """Class accuracy, and FID, KID, precision/recall in the demo network's features and in 16x16 thumbnails:
    generated, reconstructed (ceiling), real (floor)."""
    from .demo import evaluate_demo
    from .features import load_demo_features
    network = load_demo_features()
    with _demo_pipe(bundle) as pipe:
        report = evaluate_demo(pipe, network, per_class, seed, reference_per_class)
    _print(report)
    _write_json(report, out)


@main.command()
@click.argument("bundle_a", type=click.Path(path_type=Path))
@click.argument("bundle_b", type=click.Path(path_type=Path))
@click.option("--per-class", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds (at least 2).")
@click.option("--features", type=click.Choice(["auto", "inception", "demo", "pixels"]), default="auto",
              show_default=True, help="auto: the demo network for demo bundles, Inception otherwise.")
@weights_option
@click.option("--backend-b", type=click.Choice(["ort", "tensorrt"]), default="ort", show_default=True,
              help="Backend for BUNDLE_B (compare ORT against TensorRT with the same bundle twice).")
@click.option("--trust-native-code", is_flag=True,
              help="Allow --backend-b tensorrt to load BUNDLE_B's plans, which can run code when loaded.")
@out_option
@one_line_errors
def compare(bundle_a, bundle_b, per_class, seeds, features, inception_weights, backend_b, trust_native_code, out):
    """Is BUNDLE_B the same generator as BUNDLE_A? B-vs-A metrics next to A's seed-to-seed spread."""
    from maskbit_runtime import Pipeline

    from .demo import compare_bundles, default_features_for, demo_labels
    try:
        seed_list = tuple(int(s) for s in seeds.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {seeds!r}", param_hint="--seeds") from None
    with Pipeline.load(bundle_a) as pipe_a, Pipeline.load(bundle_b, backend=backend_b,
                                                               trust_native_code=trust_native_code) as pipe_b:
        network = default_features_for(pipe_a, features, inception_weights)
        report = compare_bundles(pipe_a, pipe_b, network, demo_labels(pipe_a, per_class), seed_list)
    _print(report)
    _write_json(report, out)


@main.command()
@click.option("--bundle", type=click.Path(path_type=Path), default=None, help="A bundle of the demo classes "
              "(default: the shipped demo bundle).")
@click.option("--plans", "plans_file", type=click.Path(path_type=Path), default=None,
              help='JSON {"name": {setting: value, ...}, ...}: sampling overrides per plan (any sampling setting); '
                   '"default", the bundle\'s own settings, is always measured.')
@click.option("--per-class", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds (at least 2).")
@click.option("--reference-per-class", type=click.IntRange(min=1), default=64, show_default=True,
              help="Held-out real crops per class in the reference set.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write the report as JSON (also after each seed round from the second: complete=false).")
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="Write the front as PNG: passes per image against FID and recall (needs matplotlib).")
@one_line_errors
def tradeoff(bundle, plans_file, per_class, seeds, reference_per_class, out, plot):
    """Cost and quality of sampling plans: per plan, transformer passes and seconds per image on this machine,
    and FID, KID, precision/recall (demo network and 16x16 thumbnails), class accuracy, each as mean and min-max
    over seeds. Marks the plan with the fewest passes that lies within the default's spread: in both feature
    spaces, its seed-mean FID at most the default's largest per-seed FID and its seed-mean precision and recall at
    least the default's smallest per-seed values."""
    from maskbit_runtime.errors import require

    from .features import load_demo_features
    from .tradeoff import DEFAULT, measure_tradeoff, parse_plans, plot_front, read_plans
    seed_list = _seeds(seeds)
    if plot:
        require("matplotlib", "eval", "--plot")      # before the measurement, not after it
    network = load_demo_features()
    with _demo_pipe(bundle) as pipe:
        plans = read_plans(plans_file, pipe.sampling) if plans_file else parse_plans({DEFAULT: {}}, pipe.sampling)
        total = len(plans) * len(seed_list) * per_class * (pipe.num_classes or 0)
        with _progress(total, f"{len(plans)} plans x {len(seed_list)} seeds") as progress:
            report = measure_tradeoff(pipe, network, plans, per_class, seed_list, reference_per_class, progress,
                                      on_partial=lambda partial: _write_json(partial, out))
    for name, entry in report["plans"].items():
        metrics = entry["metrics"]
        click.echo(f"{name}: {entry['transformer_passes_per_image']} passes/image, "
                   f"{entry['seconds_per_image']['mean']:.3f} s/image, "
                   + ", ".join(f"{m} {metrics[m]['mean']:.4g} [{metrics[m]['min']:.4g}, {metrics[m]['max']:.4g}]"
                               for m in ("fid", "precision", "recall", "pixels_precision", "pixels_recall",
                                         "class_accuracy"))
                   + (" (within the default's spread)" if entry["within_default_spread"] else ""))
    click.echo(f"marked: {report['marked']} ({report['marked_passes_saved_vs_default']:.2f}x fewer passes than "
               f"the default); load average {report['machine']['load_average']} -> "
               f"{report['machine']['load_average_end']}")
    _write_json(report, out)
    if plot:
        plot_front(report, plot)
        click.echo(f"wrote {plot}")


def _seeds(seeds: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in seeds.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {seeds!r}", param_hint="--seeds") from None


@main.command("train-demo-network")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Weights file (.safetensors).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Training steps (default: the shipped recipe).")
@one_line_errors
def train_demo_network_command(out, steps):
    """Train the demo feature network on real demo crops and report its held-out accuracy."""
    from .demo_network import train_demo_network
    metadata = train_demo_network(out, **({"steps": steps} if steps else {}))
    click.echo(f"held-out accuracy {float(metadata['held_out_accuracy']):.4f} on {metadata['held_out_images']} "
               f"real crops (seed {metadata['held_out_seed']}); wrote {out}")
if __name__ == "__main__":
    main()
