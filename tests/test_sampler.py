"""The sampler's semantics: schedules, exact categorical draws, re-masking, seeding, label checks."""

import numpy as np
import pytest
import torch
from maskbit_runtime.noise import StepNoise
from maskbit_runtime.schedules import guidance_scale_schedule, mask_ratio, num_to_mask_schedule, plan_steps

import maskbit
from maskbit.step import GenerationStep, categorical_draw, lowest_k_mask

SPEC_14BIT_T64 = [506, 501, 496, 491, 486, 481, 476, 471, 466, 460, 455, 450, 445, 440, 434, 429, 424, 419, 413, 408,
                  403, 397, 392, 386, 381, 375, 370, 364, 358, 352, 347, 341, 335, 329, 323, 317, 311, 304, 298, 291,
                  285, 278, 271, 264, 257, 250, 243, 235, 227, 219, 211, 202, 193, 184, 174, 164, 153, 142, 129, 115,
                  100, 81, 57, 1]


def test_mask_schedule_matches_spec_for_14bit_64_steps():
    assert num_to_mask_schedule(64, 256 * 2, "arccos") == SPEC_14BIT_T64


def test_guidance_schedule_matches_spec():
    scales = guidance_scale_schedule(7.1, 64, "cosine", 3.0)
    assert [round(scales[i], 4) for i in (0, 16, 32, 48, 63)] == [0.0, 0.0043, 0.2702, 2.6874, 7.0628]
    assert guidance_scale_schedule(2.0, 4, "linear") == [0.0, 0.5, 1.0, 1.5]
    assert guidance_scale_schedule(2.0, 3, "none") == [2.0, 2.0, 2.0]


@pytest.mark.parametrize("schedule, p, expected", [
    ("linear", 0.25, 0.75), ("square", 0.5, 0.75), ("root", 0.25, 0.5), ("cosine", 1 / 3, np.cos(np.pi / 6)),
    ("arccos", 0.5, 2 / 3), ("arccos", 1.0, 1e-6)])
def test_mask_ratio_formulas(schedule, p, expected):
    assert mask_ratio(p, schedule) == pytest.approx(expected, rel=1e-6)


def test_plan_anneals_temperature_and_noise():
    plan = plan_steps(4, 100, guidance_scale=1.0, randomize_temperature=8.0, use_sampling_annealing=True)
    assert [p.confidence_noise_scale for p in plan] == pytest.approx([6.0, 4.0, 2.0, 0.0])
    assert [p.softmax_temperature for p in plan] == pytest.approx([1.1, 0.9, 0.7, 0.5])
    assert all(a.num_to_mask > b.num_to_mask for a, b in zip(plan, plan[1:]))


def test_categorical_draw_is_exact():
    """Chi-square test of the inverse-CDF draw against the categorical distribution."""
    rng = np.random.default_rng(0)
    probs = torch.tensor([0.5, 0.25, 0.15, 0.0, 0.1])
    n = 200_000
    u = torch.from_numpy(rng.random(n, dtype=np.float32))
    draws = categorical_draw(probs.expand(n, 5), u)
    counts = torch.bincount(draws, minlength=5).double()
    assert counts[3] == 0                                   # zero-probability classes are never drawn
    expected = probs.double() * n
    keep = expected > 0
    chi2 = (((counts - expected) ** 2)[keep] / expected[keep]).sum().item()
    assert chi2 < 18.47                                     # p = 0.001 for 4 degrees of freedom
    edges = categorical_draw(probs[None].expand(3, 5), torch.tensor([0.0, 0.4999, 0.5]))
    assert edges.tolist() == [0, 0, 1]


def test_lowest_k_mask_exact_count_and_ties_by_position():
    conf = torch.tensor([[3.0, 1.0, 1.0, float("inf"), 1.0, 0.5]])
    for k in range(6):
        mask = lowest_k_mask(conf, torch.tensor(k))
        assert mask.sum().item() == k
    assert lowest_k_mask(conf, torch.tensor(3))[0].tolist() == [False, True, True, False, False, True]
    assert lowest_k_mask(conf, torch.tensor(2))[0].tolist() == [False, True, False, False, False, True]


def test_step_remasks_exactly_and_keeps_decided_groups():
    torch.manual_seed(0)
    gen = maskbit.build_generator("tiny_lfq10")
    step = GenerationStep(gen).eval()
    C = gen.config.mask_token
    tokens = torch.full((2, 64, 2), C)
    tokens[:, :10] = 7                                      # decided groups
    tokens_before = tokens.clone()
    noise = torch.from_numpy(StepNoise(0, 2, 64, 2).draw())
    with torch.no_grad():
        nxt, sampled = step(tokens, torch.tensor([1, 2]), noise, torch.tensor(2.0), torch.tensor(1.0),
                            torch.tensor(3.0), torch.tensor(50))
    assert torch.equal(tokens, tokens_before)
    assert ((nxt == C).sum(dim=(1, 2)) == 50).all()
    assert (sampled < C).all() and (sampled[:, :10] == 7).all() and (nxt[:, :10] == 7).all()
    assert torch.equal(torch.where(nxt == C, sampled, nxt), sampled)


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    return maskbit.build_tokenizer("tiny_lfq10"), maskbit.build_generator("tiny_lfq10")


def test_same_seed_same_output_different_seed_different(tiny_pair):
    tok, gen = tiny_pair
    a = maskbit.generate(tok, gen, labels=[1, 7], num_steps=6, seed=0)
    b = maskbit.generate(tok, gen, labels=[1, 7], num_steps=6, seed=0)
    c = maskbit.generate(tok, gen, labels=[1, 7], num_steps=6, seed=1)
    assert a.images.dtype == np.uint8 and a.images.shape == (2, 32, 32, 3)
    assert a.tokens.dtype == np.int64 and a.tokens.shape == (2, 8, 8)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.images, b.images)
    assert (a.tokens != c.tokens).mean() > 0.5


def test_an_image_does_not_depend_on_its_batch(tiny_pair):
    tok, gen = tiny_pair
    both = maskbit.generate(tok, gen, labels=[1, 7], num_steps=6, seed=3)
    second = maskbit.generate(tok, gen, labels=[7], num_steps=6, seed=3)
    assert not np.array_equal(both.tokens[1], second.tokens[0])      # image index is part of the stream
    first = maskbit.generate(tok, gen, labels=[1], num_steps=6, seed=3)
    assert np.array_equal(both.tokens[0], first.tokens[0])


def test_sampling_defaults_come_from_the_config(tiny_pair):
    tok, gen = tiny_pair
    steps = []
    maskbit.generate(tok, gen, labels=[0], seed=0, on_step=steps.append)
    assert len(steps) == gen.sampling_config.num_steps == 8


def test_guidance_zero_runs_conditional_only(tiny_pair):
    tok, gen = tiny_pair
    out = maskbit.generate(tok, gen, labels=[0, 1], num_steps=4, guidance_scale=0.0, seed=0)
    assert out.tokens.shape == (2, 8, 8)


def test_bad_labels_are_refused(tiny_pair):
    tok, gen = tiny_pair
    with pytest.raises(ValueError, match="label 1000 is out of range"):
        maskbit.generate(tok, gen, labels=[1, 1000], num_steps=2)
    with pytest.raises(ValueError, match="out of range"):
        maskbit.generate(tok, gen, labels=[-1], num_steps=2)
    with pytest.raises(ValueError, match="non-empty"):
        maskbit.generate(tok, gen, labels=[], num_steps=2)


def test_noise_is_open_unit_interval_and_seeded():
    a = StepNoise(5, 3, 64, 2).draw()
    assert a.dtype == np.float32 and a.shape == (3, 64, 2, 2)
    assert a.min() > 0 and a.max() < 1
    assert np.array_equal(a, StepNoise(5, 3, 64, 2).draw())
    assert np.array_equal(a[1:], StepNoise(5, 2, 64, 2, first_index=1).draw())
