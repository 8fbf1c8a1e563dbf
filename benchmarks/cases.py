"""The timed cases of each benchmark group, and the checks that their outputs are right.

Each builder returns {case name: zero-argument callable}; one call is one timed unit (a step, a generation,
a decode). State that a call needs is prepared here, outside the timed call. `*_checks` return, per case, a
zero-argument callable that raises AssertionError when the case computes something else than eager float32:
equal tokens (within the export tolerances) for float32 backends, the distribution gate for reduced precision.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from maskbit_export.tolerances import tolerance
from maskbit_export.verify import (compare, distribution_report, eager_logits, run_eager, session_logits,
                                   step_feeds)
from maskbit_runtime import specs
from maskbit_runtime.backends import Executor
from maskbit_runtime.noise import StepNoise
from maskbit_runtime.scheduler import ImageJob, Scheduler
from official_loop import official_generate, official_step

import maskbit
from maskbit.bits import combine_groups
from maskbit.step import GenerationStep
from maskbit.tokenizer import images_to_uint8

Cases = dict[str, Callable[[], object]]


def sampling_plan(generator, num_steps: int):
    settings = generator.sampling_config.with_overrides(num_steps=num_steps)
    return settings.plan(generator.config.num_tokens * generator.config.codebook_splits), settings.to_dict()


def _passes(report: dict) -> None:
    assert report["passed"], {k: v for k, v in report.items() if k in ("tv_mean", "tv_worst_step", "gate", "reason",
                                                                         "mismatch_fraction", "max_abs")}


def gate_results(generator, pipelines, labels: np.ndarray, num_steps: int) -> dict[str, dict]:
    """The distribution gate of the reduced-precision cases: int8 (the bundle's transformer graph) and bf16."""
    plan, _ = sampling_plan(generator, num_steps)
    session = pipelines["int8"].backend.primitives.session("transformer")
    return {"ort_int8": distribution_report(generator, session_logits(session), labels.tolist(), plan, "int8"),
            "eager_bf16": distribution_report(generator, eager_logits(generator, bf16=True), labels.tolist(), plan,
                                              "bf16")}


def mid_generation_tokens(cfg, batch: int) -> np.ndarray:
    """A state half-way through a generation: half of the groups masked."""
    rng = np.random.default_rng(1)
    shape = (batch, cfg.num_tokens, cfg.codebook_splits)
    return np.where(rng.random(shape) < 0.5, cfg.mask_token,
                    rng.integers(0, cfg.group_classes, shape)).astype(np.int64)


def step_cases(generator, pipelines, labels: np.ndarray) -> Cases:
    """One unmasking step with guidance, half-way through a generation of the preset's length."""
    cfg = generator.config
    num_steps = generator.sampling_config.num_steps
    plan, settings = sampling_plan(generator, num_steps)
    i = num_steps // 2
    tokens, t_labels = torch.from_numpy(mid_generation_tokens(cfg, len(labels))), torch.from_numpy(labels)
    official = dict(guidance_scale=settings["guidance_scale"], scale_pow=settings["scale_pow"],
                    randomize_temperature=settings["randomize_temperature"])

    def eager_fp32():
        with torch.inference_mode():
            return official_step(generator, tokens, t_labels, i, num_steps, **official)

    def eager_bf16():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return official_step(generator, tokens, t_labels, i, num_steps, **official)

    cases = {"eager_fp32": eager_fp32, "eager_bf16": eager_bf16}
    for precision, pipe in pipelines.items():
        cases[f"ort_{precision}"] = scheduled_step(pipe, labels, settings, i)
    return cases


def scheduled_step(pipe, labels: np.ndarray, settings: dict, i: int) -> Callable[[], object]:
    """One `Scheduler.iterate()` over len(labels) images held at step i of a generation of the settings' length:
    the step graph plus the host's per-step work (noise drawn for every row, the per-row settings and the noise
    uploaded, the binding run; no retirement, no decode). The images are admitted before timing, and each call
    winds their step counter back to i, so every call runs step i. Its own executor over the pipeline's
    primitives keeps these slots apart from the pipeline's generations."""
    plan = pipe.sampling.with_overrides(**settings)
    if not 0 <= i <= plan.num_steps - 2:
        raise ValueError(f"step {i} of {plan.num_steps} would be the last: that call would retire and decode")
    jobs = [ImageJob(int(label), 0, j, plan) for j, label in enumerate(labels)]
    scheduler = Scheduler(Executor(pipe.backend.primitives, pipe.manifest), capacity=len(labels))
    scheduler.submit(jobs)
    scheduler.iterate()                  # admission (and one step) outside the timed calls

    def step():
        for job in jobs:
            job.step = i
        return scheduler.iterate()
    return step


def step_checks(generator, pipelines, labels: np.ndarray, gate: dict) -> dict[str, Callable[[], None]]:
    """ort_fp32: the exported step's groups equal the eager step's on the same inputs; reduced precision: the gate;
    the official-style eager step: a valid token grid."""
    cfg = generator.config
    plan, settings = sampling_plan(generator, generator.sampling_config.num_steps)
    params = plan[len(plan) // 2]
    inputs = step_feeds(mid_generation_tokens(cfg, len(labels)), labels,
                        StepNoise(0, len(labels), cfg.num_tokens, cfg.codebook_splits).draw(), params)

    def ort_fp32():
        session = pipelines["fp32"].backend.primitives.session("step")
        exported = session.run([specs.SAMPLED], inputs)[0]
        eager = run_eager(GenerationStep(generator).eval(), specs.STEP, inputs)[specs.SAMPLED]
        _passes(compare(eager, exported, tolerance("fp32", "step")))

    def official():
        with torch.inference_mode():
            tokens, _ = official_step(generator, torch.from_numpy(inputs[specs.TOKENS]), torch.from_numpy(labels),
                                      len(plan) // 2, len(plan), settings["guidance_scale"], settings["scale_pow"],
                                      settings["randomize_temperature"])
        assert tokens.shape == inputs[specs.TOKENS].shape and int(tokens.max()) <= cfg.mask_token
    return {"eager_fp32": official, "eager_bf16": lambda: _passes(gate["eager_bf16"]), "ort_fp32": ort_fp32,
            "ort_int8": lambda: _passes(gate["ort_int8"])}


def generate_cases(tokenizer, generator, pipelines, labels: np.ndarray, num_steps: int) -> Cases:
    """A whole generation, labels -> uint8 images, with `num_steps` steps."""
    cfg = generator.config
    _, settings = sampling_plan(generator, num_steps)
    t_labels = torch.from_numpy(labels)

    def eager_official():
        with torch.inference_mode():
            groups = official_generate(generator, t_labels, num_steps, settings["guidance_scale"],
                                       settings["scale_pow"], settings["randomize_temperature"])
            side = tokenizer.config.latent_size
            return images_to_uint8(tokenizer.decode_tokens(combine_groups(groups, cfg.num_bits).view(-1, side, side)))

    cases = {"eager_official": eager_official}
    for precision, pipe in pipelines.items():
        cases[f"ort_{precision}"] = lambda pipe=pipe: pipe.generate(labels, num_steps=num_steps, seed=0)
    return cases


def generate_checks(tokenizer, generator, pipelines, labels: np.ndarray, num_steps: int,
                    gate: dict) -> dict[str, Callable[[], None]]:
    """ort_fp32: the same tokens as the eager sampler for the same seed; int8: the gate (same bundle)."""
    def ort_fp32():
        eager = maskbit.generate(tokenizer, generator, labels.tolist(), num_steps=num_steps, seed=0)
        exported = pipelines["fp32"].generate(labels, num_steps=num_steps, seed=0)
        np.testing.assert_array_equal(exported.tokens, eager.tokens)

    def official():
        images = generate_cases(tokenizer, generator, {}, labels, num_steps)["eager_official"]()
        assert images.dtype == torch.uint8 and tuple(images.shape[1:]) == (tokenizer.config.resolution,) * 2 + (3,)
    return {"eager_official": official, "ort_fp32": ort_fp32, "ort_int8": lambda: _passes(gate["ort_int8"])}


def overhead_cases(generator, pipe, labels: np.ndarray, num_steps: int) -> Cases:
    """Loops and bare transformer calls of a model whose step is cheap (same dims, no transformer layers).

    (loop time / steps) - (one guided transformer forward) is the loop's own cost per step: sampling, re-masking,
    noise, schedules, buffer updates and Python. It does not depend on depth, so it is measured here, where it
    is not lost in the noise of a full-size forward, and then compared with a full-size step. The runtime's loop
    is `Scheduler.run` over the images (the one execution model), so it also includes their admission and the
    final combine + decode, spread over the steps (the eager loop stops at the sampled groups).
    """
    cfg = generator.config
    _, settings = sampling_plan(generator, num_steps)
    t_labels = torch.from_numpy(labels)
    tokens = torch.from_numpy(mid_generation_tokens(cfg, len(labels)))
    doubled = (torch.cat([tokens, tokens]), torch.cat([t_labels, t_labels]),
               torch.cat([torch.zeros(len(labels), dtype=torch.bool), torch.ones(len(labels), dtype=torch.bool)]))
    session = pipe.backend.primitives.session("transformer")
    feeds = {specs.TOKENS: doubled[0].numpy(), specs.LABELS: doubled[1].numpy(),
             specs.DROP_LABEL_MASK: doubled[2].numpy()}
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    binding.bind_output(specs.LOGITS)

    def eager_loop():
        return official_generate(generator, t_labels, num_steps, settings["guidance_scale"], settings["scale_pow"],
                                 settings["randomize_temperature"])

    def eager_forward():
        with torch.inference_mode():
            return generator(*doubled)

    executor = Executor(pipe.backend.primitives, pipe.manifest)       # its own slots, apart from the pipeline's
    sampling = pipe.sampling.with_overrides(**settings)

    def ort_loop():
        jobs = [ImageJob(int(label), 0, j, sampling) for j, label in enumerate(labels)]
        Scheduler(executor, capacity=len(labels)).run(jobs)
        return jobs

    return {"eager_loop": eager_loop, "eager_forward": eager_forward, "ort_loop": ort_loop,
            "ort_forward": lambda: session.run_with_iobinding(binding)}


def codec_cases(tokenizer, pipe, component: str, batch: int) -> Cases:
    """The decoder (indices -> uint8 images) or the encoder (images -> indices), eager and runtime."""
    rng = np.random.default_rng(0)
    side, size = tokenizer.config.latent_size, tokenizer.config.resolution
    if component == "decoder":
        data = rng.integers(0, tokenizer.config.codebook_size, (batch, side, side), dtype=np.int64)
        eager = lambda x: images_to_uint8(tokenizer.decode_tokens(x))
        runtime = pipe.decode
    else:
        data = rng.random((batch, 3, size, size), dtype=np.float32)
        eager = tokenizer.encode
        runtime = pipe.encode
    t_data = torch.from_numpy(data)

    def eager_fp32():
        with torch.inference_mode():
            return eager(t_data)
    return {"eager_fp32": eager_fp32, "ort_fp32": lambda: runtime(data)}


def codec_check(cases: Cases, component: str) -> Callable[[], None]:
    """The runtime's decoder/encoder output against eager's, within the export tolerances."""
    def check():
        eager, exported = np.asarray(cases["eager_fp32"]()), cases["ort_fp32"]()
        _passes(compare(eager, exported, tolerance("fp32", component)))
    return check
