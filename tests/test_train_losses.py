"""Every loss term, the LR schedule and the EMA decay against hand-computed values (MASKBIT_SPEC 6.1-6.4)."""

import math

import pytest
import torch
import torch.nn.functional as F
from train_support import REPO  # noqa: F401  (sets torch threads)

from maskbit.presets import get_preset
from maskbit.quantizers import QuantizerOutput
from maskbit.train.ema import EMA
from maskbit.train.losses import (
    TokenizerLoss,
    entropy_annealing,
    hinge_d_loss,
    hinge_g_loss,
    lecam_loss,
    mlm_loss,
    quantizer_objective,
)
from maskbit.train.schedule import cosine_with_minimum, ema_decay, make_scheduler, mask_groups
from maskbit.train.settings import build_settings


def test_hinge_discriminator_both_sides():
    real = torch.tensor([2.0, 0.5, -1.0])       # relu(1 - x) = 0, 0.5, 2   -> mean 2.5/3
    fake = torch.tensor([-2.0, 0.0, 1.0, 0.5])  # relu(1 + x) = 0, 1, 2, 1.5 -> mean 4.5/4
    expected = 0.5 * (2.5 / 3 + 4.5 / 4)
    assert hinge_d_loss(real, fake).item() == pytest.approx(expected, abs=1e-7)
    # the real side alone: perfect fakes at <= -1 contribute nothing
    assert hinge_d_loss(real, torch.full((4,), -3.0)).item() == pytest.approx(0.5 * 2.5 / 3, abs=1e-7)
    assert hinge_g_loss(fake).item() == pytest.approx(-(-2.0 + 0.0 + 1.0 + 0.5) / 4)


def test_lecam_hand_value():
    # relu(0.3 - (-0.2))^2 + relu(0.1 - (-0.4))^2 = 0.25 + 0.25; a side with negative margin is 0
    value = lecam_loss(torch.tensor(0.3), torch.tensor(-0.4), torch.tensor([0.1]), torch.tensor([-0.2]))
    assert value.item() == pytest.approx(0.5, abs=1e-6)
    value = lecam_loss(torch.tensor(-1.0), torch.tensor(2.0), torch.tensor([0.0]), torch.tensor([0.0]))
    assert value.item() == 0.0


def test_discriminator_loss_uses_then_updates_lecam_ema():
    settings = build_settings(get_preset("tiny_lfq10"), "tokenizer",
                              {"discriminator.hidden_channels": 32, "losses.discriminator_start": 0})
    module = TokenizerLoss(settings)
    module.ema_real_logits_mean.fill_(0.5)
    module.ema_fake_logits_mean.fill_(-0.25)
    const = {"real": 0.75, "fake": 0.25}

    def disc(x):   # first half real, second half fake
        b = x.shape[0] // 2
        return torch.cat([torch.full((b, 1, 16, 16), const["real"]), torch.full((b, 1, 16, 16), const["fake"])])

    images = torch.zeros(2, 3, 32, 32)
    loss, _logs = module.discriminator_loss(images, images, step=0, discriminator=disc)
    hinge = 0.5 * ((1 - 0.75) + (1 + 0.25))
    lecam = (0.75 - (-0.25)) ** 2 + max(0.0, 0.5 - 0.25) ** 2      # uses the buffers before the update
    assert loss.item() == pytest.approx(hinge + 0.001 * lecam, abs=1e-6)
    assert module.ema_real_logits_mean.item() == pytest.approx(0.999 * 0.5 + 0.001 * 0.75, abs=1e-7)
    assert module.ema_fake_logits_mean.item() == pytest.approx(0.999 * -0.25 + 0.001 * 0.25, abs=1e-7)


def test_entropy_annealing_and_quantizer_objective():
    assert entropy_annealing(0, 2000, 2.0) == 2.0
    assert entropy_annealing(500, 2000, 2.0) == pytest.approx(1.5)
    assert entropy_annealing(2000, 2000, 2.0) == 0.0 and entropy_annealing(5000, 2000, 2.0) == 0.0
    assert entropy_annealing(10, 2000, 0.0) == 0.0          # vqgan_plus configs
    z = torch.tensor(0.0)
    out = QuantizerOutput(torch.zeros(1), quantizer_loss=torch.tensor(0.3), commitment_loss=torch.tensor(0.1),
                          entropy_loss=torch.tensor(0.2), per_sample_entropy=z, avg_entropy=z)
    # Q = quantizer_loss + max(0, 1 - s/2000) * 2 * entropy_loss -> 0.3 + 1.5 * 0.2 at s = 500
    assert quantizer_objective(out, 500, 2000, 2.0).item() == pytest.approx(0.6)


def test_generator_side_total_matches_formula():
    settings = build_settings(get_preset("tiny_lfq10"), "tokenizer",
                              {"losses.perceptual_weight": 0, "losses.discriminator_start": 3,
                               "discriminator.hidden_channels": 32})
    module = TokenizerLoss(settings)
    torch.manual_seed(0)
    images, recon = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32, requires_grad=True)
    z = torch.tensor(0.0)
    out = QuantizerOutput(torch.zeros(1), torch.tensor(0.3), torch.tensor(0.1), torch.tensor(0.2), z, z)
    total, _ = module.generator_loss(images, recon, out, step=2)          # before discriminator_start
    assert total.item() == pytest.approx(4.0 * F.mse_loss(recon, images).item() + 0.3 + 2.0 * (1 - 2 / 2000) * 0.2,
                                         rel=1e-6)
    total, _logs = module.generator_loss(images, recon, out, step=3)
    g = -module.discriminator(recon).mean().item()
    assert total.item() == pytest.approx(4.0 * F.mse_loss(recon, images).item() + 0.3 + 2.0 * (1 - 3 / 2000) * 0.2
                                         + 0.02 * g, rel=1e-5)
    total.backward()
    assert all(p.grad is None for p in module.discriminator.parameters())   # D frozen on the generator side
    assert all(p.requires_grad for p in module.discriminator.parameters())


def test_label_smoothing_cross_entropy_by_hand():
    logits = torch.tensor([[[[2.0, 0.0, -1.0, 0.5]]], [[[0.0, 0.0, 0.0, 0.0]]]])   # (B=2, N=1, M=1, C=4)
    targets = torch.tensor([[[0]], [[3]]])
    eps, c = 0.1, 4
    total = 0.0
    for row, t in zip(logits.reshape(2, 4), targets.reshape(2)):
        logp = row - torch.logsumexp(row, 0)
        total += -((1 - eps) * logp[t] + eps / c * logp.sum()).item()
    assert mlm_loss(logits, targets, 0.1).item() == pytest.approx(total / 2, rel=1e-6)
    assert mlm_loss(logits, targets, 0.1, sum_splits=True).item() == pytest.approx(total / 2, rel=1e-6)  # M = 1


def test_lr_schedule_warmup_middle_end():
    w, total = 100, 1100
    assert cosine_with_minimum(0, w, total) == 0.0
    assert cosine_with_minimum(50, w, total) == pytest.approx(0.5)
    assert cosine_with_minimum(100, w, total) == pytest.approx(1.0)
    assert cosine_with_minimum(600, w, total) == pytest.approx(0.1 + 0.9 * 0.5)         # progress 1/2
    assert cosine_with_minimum(350, w, total) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine_with_minimum(1100, w, total) == pytest.approx(0.1)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = make_scheduler(opt, w, total)
    for _ in range(600):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.55)


def test_lr_schedule_of_an_extended_run_follows_its_new_length():
    """A run resumed with a larger --max-steps continues on the schedule of the new length (the saved state must not
    pin the old length: before the fix the cosine rose again past it); past its end the minimum holds."""
    w, short, long = 10, 50, 100
    assert cosine_with_minimum(long + 40, w, long) == pytest.approx(0.1)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = make_scheduler(opt, w, short)
    for _ in range(short):
        opt.step()
        sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    for old_format in (False, True):
        state = dict(saved_sched, lr_lambdas=[{"args": (w, short, 0.1)}]) if old_format else saved_sched
        opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        opt2.load_state_dict(saved_opt)
        resumed = make_scheduler(opt2, w, long)
        resumed.load_state_dict(state)
        for step in range(short + 1, short + 31):
            opt2.step()
            resumed.step()
            assert opt2.param_groups[0]["lr"] == pytest.approx(1e-3 * cosine_with_minimum(step, w, long))


def test_ema_decay_formula_and_update():
    assert ema_decay(1) == 0.0 and ema_decay(0) == 0.0
    assert ema_decay(2) == pytest.approx(2 / 11)           # (1 + t) / (10 + t), t = 1
    assert ema_decay(10) == pytest.approx(10 / 19)
    assert ema_decay(100_000) == 0.999
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)                                       # decay 0: copies
    assert ema.shadow["weight"].item() == 3.0
    with torch.no_grad():
        model.weight.fill_(14.0)
    ema.update(model)                                       # decay 2/11: 3 - (9/11)(3 - 14) = 12
    assert ema.shadow["weight"].item() == pytest.approx(12.0)


def test_training_mask_uses_runtime_schedule_formula():
    groups = torch.zeros(4000, 8, 2, dtype=torch.int64)
    gen = torch.Generator().manual_seed(0)
    r = torch.rand(4000, generator=torch.Generator().manual_seed(0))
    masked, mask = mask_groups(groups, 32, "arccos", gen)
    assert torch.equal(masked == 32, mask)
    per_sample = mask.float().flatten(1).mean(1)
    expected = torch.arccos(r) / (math.pi / 2)
    # per-sample Bernoulli(ratio) over 16 groups: the mean over samples of (observed - ratio) is ~0
    assert abs(float((per_sample - expected).mean())) < 0.01
    assert float(torch.corrcoef(torch.stack([per_sample, expected]))[0, 1]) > 0.9
    # E[arccos(r)/(pi/2)] for r ~ U[0,1) is 2/pi
    assert float(mask.float().mean()) == pytest.approx(2 / math.pi, abs=0.01)
