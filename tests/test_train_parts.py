"""Discriminator layout, metrics, settings and data pieces of maskbit.train."""

import json
import math
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from train_support import make_photo_folder

from maskbit.config import ConfigError
from maskbit.image_quality import psnr, ssim, ssim_map
from maskbit.presets import get_preset, resolve_config
from maskbit.train.data import BatchStream, DataError, ImageSource, Preprocess, scan
from maskbit.train.discriminator import BlurBlock, Discriminator
from maskbit.train.metrics import codebook_stats, masked_group_stats
from maskbit.train.settings import build_settings, split_overrides

SPEC = Path("/work/shared/reference/MASKBIT_SPEC.md")
CONFIGS = Path("/work/shared/reference/official_configs")


def _appendix_b() -> list[tuple[str, list[int]]]:
    text = SPEC.read_text().split("## Appendix B")[1].split("```")[1]
    return [(m.group(1), [int(x) for x in m.group(2).split(",")])
            for m in re.finditer(r"^(\S+) \[([\d,]+)\]$", text, re.MULTILINE)]


@pytest.mark.skipif(not SPEC.exists(), reason="reference spec not present")
def test_discriminator_state_dict_matches_appendix_b():
    disc = Discriminator()
    expected = _appendix_b()
    assert len(expected) == 26
    assert [(k, list(v.shape)) for k, v in disc.state_dict().items()] == expected
    assert sum(p.numel() for p in disc.parameters()) == 7_431_297
    assert all(m.eps == 1e-5 for m in disc.modules() if isinstance(m, torch.nn.GroupNorm))


def test_blur_block_kernel_and_padding():
    blur = BlurBlock(4)
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    assert torch.allclose(blur.kernel[0, 0], torch.outer(taps, taps) / 64)
    x = torch.ones(1, 2, 8, 8)
    y = blur(x)
    assert y.shape == (1, 2, 4, 4)
    # interior outputs of a constant image are the constant; pad 1 before/after -> first output sees a zero row
    assert y[0, 0, 1, 1].item() == pytest.approx(1.0)
    assert y[0, 0, 0, 1].item() == pytest.approx(1 - 4 / 64 * 1 * 2)   # kernel row 0 weight = (1 * 8) / 64
    assert Discriminator(hidden_channels=32)(torch.rand(2, 3, 32, 32)).shape == (2, 1, 16, 16)


def test_psnr_hand_value():
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[0] += 0.1                      # MSE 0.01 -> 20 dB
    y[1, 0] += 0.5                   # MSE 0.25 / 3
    values = psnr(x, y)
    assert values[0].item() == pytest.approx(20.0, abs=1e-6)
    assert values[1].item() == pytest.approx(10 * math.log10(3 / 0.25), abs=1e-6)


def test_ssim_matches_scikit_image_in_the_interior():
    from skimage.metrics import structural_similarity
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 40, 40, generator=gen)
    y = (x + 0.1 * torch.randn(1, 3, 40, 40, generator=gen)).clamp(0, 1)
    _, full = structural_similarity(x[0].permute(1, 2, 0).numpy().astype(np.float64),
                                    y[0].permute(1, 2, 0).numpy().astype(np.float64), channel_axis=2,
                                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=1.0, full=True)
    ours = ssim_map(x, y)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours[5:-5, 5:-5], full[5:-5, 5:-5], atol=1e-6)
    assert ssim(x, x).item() == pytest.approx(1.0)


def test_training_logs_the_psnr_and_ssim_maskbit_eval_reports(tmp_path):
    """One definition (maskbit.image_quality): the tokenizer stage's evaluation and `maskbit-eval reconstruction`
    give the same PSNR and SSIM for the same originals and reconstructions (training sees them as float32 in
    [0, 1], evaluation as uint8, so they agree to float32 rounding)."""
    from types import SimpleNamespace

    import skimage.data

    from maskbit.evaluation.images import open_images
    from maskbit.evaluation.reconstruction import evaluate_reconstruction
    from maskbit.train.loop_tokenizer import TokenizerStage

    rng = np.random.default_rng(0)
    photo = skimage.data.astronaut()
    originals = np.stack([photo[r:r + 32, c:c + 32] for r, c in rng.integers(0, 480, (12, 2))])   # (12, 32, 32, 3)
    recons = np.clip(originals + rng.normal(0, 12, originals.shape), 0, 255).astype(np.uint8)
    to_float = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255     # what the data loader gives

    batches = [(to_float(originals[i:i + 5]), None) for i in range(0, 12, 5)]
    served = iter(to_float(recons[i:i + 5]) for i in range(0, 12, 5))
    model = lambda images: (next(served), SimpleNamespace(indices=torch.zeros(len(images), 4, dtype=torch.long)))
    stage = TokenizerStage(resolve_config("tiny_lfq10"), None, None, SimpleNamespace(device=torch.device("cpu")))
    logged = stage.evaluate(model, batches)

    class Pipe:                                   # a bundle whose tokenizer reconstructs `recons`
        manifest = SimpleNamespace(dims=SimpleNamespace(image_size=32), codebook_size=4)
        done = 0

        def encode(self, batch, batch_size):
            self.done += len(batch)
            return np.arange(self.done - len(batch), self.done).reshape(-1, 1, 1) % 4

        def decode(self, tokens, batch_size):
            return recons[self.done - len(tokens):self.done]

    np.savez(tmp_path / "originals.npz", arr_0=originals)
    reported = evaluate_reconstruction(Pipe(), open_images(tmp_path / "originals.npz"), batch_size=4)
    assert 10 < reported["psnr"] < 40 and 0.2 < reported["ssim"] < 0.99
    assert logged["psnr"] == pytest.approx(reported["psnr"], abs=1e-5)
    assert logged["ssim"] == pytest.approx(reported["ssim"], abs=1e-6)


def test_codebook_and_masked_stats():
    stats = codebook_stats(torch.tensor([0, 0, 1, 3]), 8)
    assert stats["codebook_usage"] == 3 / 8
    assert stats["codebook_entropy"] == pytest.approx(1.5, abs=1e-6)     # p = 1/2, 1/4, 1/4
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 0, 0, 2] = 5.0
    out = masked_group_stats(logits, torch.tensor([[[2], [1]]]), torch.tensor([[[True], [False]]]))
    assert out["masked_accuracy"] == 1.0 and out["masked_count"] == 1


def test_settings_defaults_yaml_and_overrides():
    tok = build_settings(get_preset("tiny_lfq10"), "tokenizer")
    gen = build_settings(get_preset("tiny_lfq10"), "generator")
    assert (tok.beta2, tok.weight_decay, tok.interpolation, tok.per_gpu_batch_size) == (0.999, 1e-4, "bilinear", 16)
    assert (gen.beta2, gen.weight_decay, gen.interpolation, gen.use_aspect_ratio_aug) == (0.96, 0.045, "bicubic", False)
    train, model = split_overrides(["losses.discriminator_start=10", "beta2=0.5", "tokenizer.token_size=8"])
    s = build_settings(get_preset("tiny_lfq10"), "tokenizer", train)
    assert s.discriminator_start == 10 and s.beta2 == 0.5 and model == {"tokenizer.token_size": 8}
    with pytest.raises(ConfigError, match="unknown setting"):
        split_overrides(["losses.discriminator_strat=1"])
    with pytest.raises(ConfigError, match="expects a int"):
        build_settings(get_preset("tiny_lfq10"), "tokenizer", {"losses.discriminator_start": "soon"})


@pytest.mark.skipif(not CONFIGS.exists(), reason="official configs not present")
def test_official_yaml_sections_are_read_and_wrong_stage_is_refused():
    cfg = resolve_config(str(CONFIGS / "tokenizer" / "vqgan_plus_10bit.yaml"))
    s = build_settings(cfg, "tokenizer")
    assert s.entropy_annealing_factor == 0.0 and s.discriminator_start == 20_000
    gen_cfg = resolve_config(str(CONFIGS / "generator" / "maskbit_generator_10bit.yaml"))
    assert build_settings(gen_cfg, "generator").label_smoothing == 0.1
    with pytest.raises(ConfigError, match="describes only a tokenizer"):
        build_settings(cfg, "generator")
    with pytest.raises(ConfigError, match="generator training config"):
        build_settings(gen_cfg, "tokenizer")


def test_folder_and_tar_shards_give_the_same_samples(tmp_path):
    root = make_photo_folder(tmp_path / "folder", per_photo=2, size=40)
    records, classes = scan(root)
    assert classes == 4 and len(records) == 8 and [r.label for r in records] == [0, 0, 1, 1, 2, 2, 3, 3]
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        with tarfile.open(shards / f"train-{s:04d}.tar", "w") as tar:
            for i, record in enumerate(records[s * 4:(s + 1) * 4]):
                tar.add(record.key, arcname=f"sample{s}{i}.png")
                cls = tmp_path / "cls"
                cls.write_text(str(record.label))
                tar.add(cls, arcname=f"sample{s}{i}.cls")
    shard_records, n = scan(str(shards / "train-{0000..0001}.tar"))
    assert n == 4 and [r.label for r in shard_records] == [r.label for r in records]
    pre = Preprocess(32)
    a = BatchStream(ImageSource(records), pre, 4, seed=1).next_batch()
    b = BatchStream(ImageSource(shard_records), pre, 4, seed=1).next_batch()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (4, 3, 32, 32) and a[0].min() >= 0 and a[0].max() <= 1


def test_stream_ranks_partition_the_single_process_batch_and_resume(tmp_path):
    records, _ = scan(make_photo_folder(tmp_path / "d", per_photo=3, size=40))
    pre = Preprocess(32)
    single = BatchStream(ImageSource(records), pre, 4, seed=3)
    ranks = [BatchStream(ImageSource(records), pre, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):                       # crosses an epoch boundary (12 images, 4 per step)
        images, _ = single.next_batch()
        parts = torch.cat([s.next_batch()[0] for s in ranks])
        assert sorted(images.sum((1, 2, 3)).tolist()) == pytest.approx(sorted(parts.sum((1, 2, 3)).tolist()))
    state = single.state()
    expected = single.next_batch()[0]
    again = BatchStream(ImageSource(records), pre, 4, seed=3)
    again.load_state(json.loads(json.dumps(state)))
    assert torch.equal(again.next_batch()[0], expected)


def test_data_errors_and_corrupt_images(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan(tmp_path / "nowhere")
    root = make_photo_folder(tmp_path / "d", per_photo=2, size=40)
    (root / "9_empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        scan(root)
    (root / "9_empty").rmdir()
    (root / "0_astronaut" / "000.png").write_bytes(b"not a png")
    records, _ = scan(root)
    source = ImageSource(records)
    images, _ = BatchStream(source, Preprocess(32), 8, seed=0).next_batch()   # 8 requested from 7 readable
    assert images.shape[0] == 8 and len(source.corrupt) == 1
    assert next(iter(source.corrupt)).endswith("000.png")
