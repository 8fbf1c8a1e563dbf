"""End-to-end training on a small photo dataset: the tokenizer learns, the generator learns, exports load."""

import math

import pytest
import torch
from train_support import FAST, make_photo_folder

import maskbit
from maskbit.train import RunOptions, train_generator, train_tokenizer
from maskbit.train.checkpointing import checkpoint_dirs
from maskbit.train.metrics import read_metrics


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_folder(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def trained_tokenizer(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    result = train_tokenizer(RunOptions(
        config="tiny_lfq10", data=str(photos), output_dir=str(out), max_steps=60, batch_size=8, eval_every=60,
        save_every=30, keep=1, overrides=FAST + ("optimizer.params.learning_rate=1e-3",
                                                 "losses.discriminator_start=55")))
    return result


def test_tokenizer_psnr_rises_by_several_db(trained_tokenizer):
    before, after = trained_tokenizer.initial_eval, trained_tokenizer.final_eval
    assert after["psnr"] > before["psnr"] + 4.0, (before, after)
    assert after["ssim"] > before["ssim"]
    assert 0 < after["codebook_usage"] <= 1


def test_tokenizer_run_logs_checkpoints_and_exports_ema(trained_tokenizer):
    logs = read_metrics(trained_tokenizer.output_dir)
    train = [r for r in logs if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 61))
    assert "gan_loss" in train[-1] and "gan_loss" not in train[50]            # discriminator from step 55
    assert "lecam_loss" in train[-1]
    dirs = checkpoint_dirs(trained_tokenizer.output_dir / "checkpoints")
    assert [d.name for d in dirs] == ["step-00000060"]                         # keep=1
    model = maskbit.load_tokenizer(trained_tokenizer.export_path)              # no config argument
    from safetensors.torch import load_file
    ema = load_file(str(dirs[-1] / "ema.safetensors"))
    for name, p in model.named_parameters():
        assert torch.equal(p, ema[name])
    raw = load_file(str(dirs[-1] / "model.safetensors"))
    assert not torch.equal(raw["encoder.conv_in.weight"], ema["encoder.conv_in.weight"])


def test_generator_masked_ce_falls_well_below_log_c(trained_tokenizer, photos, tmp_path):
    result = train_generator(RunOptions(
        config="tiny_lfq10", data=str(photos), output_dir=str(tmp_path), tokenizer=str(trained_tokenizer.export_path),
        max_steps=240, batch_size=8, eval_every=80, save_every=0,
        overrides=("lr_scheduler.params.warmup_steps=5", "optimizer.params.learning_rate=1e-3",
                   "experiment.log_every=10", "training.ema_decay=0.9")))
    log_c = math.log(32)
    assert result.initial_eval["log_classes"] == pytest.approx(log_c)
    assert result.initial_eval["masked_ce"] > 0.9 * log_c                    # untrained: about uniform
    assert result.final_eval["masked_ce"] < 0.75 * log_c, result.final_eval
    gen = maskbit.load_generator(result.export_path)
    assert gen.config == maskbit.get_preset("tiny_lfq10").generator


def test_perceptual_and_bf16_path_runs(photos, tmp_path):
    result = train_tokenizer(RunOptions(
        config="tiny_lfq10", data=str(photos), output_dir=str(tmp_path), max_steps=2, batch_size=2, eval_every=0,
        save_every=0, bf16=True, random_perceptual=True,
        overrides=("discriminator.hidden_channels=32", "losses.discriminator_start=1", "experiment.log_every=1")))
    last = result.last_log
    assert math.isfinite(last["perceptual_loss"]) and last["perceptual_loss"] > 0 and "gan_loss" in last
