"""The slot scheduler: rows at different steps with different settings share calls, and every image equals its
own offline generation byte for byte, whatever it was batched with and whenever it was admitted."""

import hashlib
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

import maskbit
from maskbit_export import ExportOptions, build_bundle
from maskbit_runtime import Pipeline
from maskbit_runtime.manifest import MANIFEST, sha256_file
from maskbit_runtime.scheduler import ImageJob, Scheduler
from maskbit_runtime.specs import STEP_SETTINGS

from conftest import ROOT

DEMO = ROOT / "runtime" / "demo" / "bundle"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    tok, gen = maskbit.build_tokenizer("tiny_lfq10"), maskbit.build_generator("tiny_lfq10")
    with torch.no_grad():
        gen.prediction_layer.weight.mul_(20.0)
    path = tmp_path_factory.mktemp("scheduler") / "bundle"
    build_bundle(path, tok, gen, options=ExportOptions(max_batch=4, verify=False))
    return path


MIXED = [   # (label, seed, index, settings overrides)
    (1, 0, 0, dict(num_steps=6)),
    (2, 0, 1, dict(num_steps=3, guidance_scale=0.0)),
    (3, 5, 7, dict(num_steps=9, guidance_annealing="linear", guidance_scale=2.5)),
    (4, 1, 2, dict(num_steps=4, mask_schedule="cosine", softmax_temperature=0.8)),
    (5, 2, 0, dict(num_steps=6, guidance_scale=0.0, randomize_temperature=2.0)),
    (6, 0, 3, dict(num_steps=2, use_sampling_annealing=True)),
    (7, 9, 4, dict(num_steps=5, guidance_scale=1.0, scale_pow=1.0)),
]


def _offline(pipe, label, seed, index, overrides):
    return pipe.generate([label], seed=seed, first_index=index, **overrides)


def _job(pipe, label, seed, index, overrides):
    return ImageJob(label, seed, index, pipe.sampling.with_overrides(**overrides))


@pytest.mark.parametrize("order", ["given", "reversed", "staggered"])
def test_mixed_rows_equal_their_offline_generations(tiny, order):
    with Pipeline.load(tiny) as pipe:
        offline = [_offline(pipe, *case) for case in MIXED]
        scheduler = Scheduler(pipe.backend, capacity=3)        # fewer slots than images: rows come and go
        jobs = [_job(pipe, *case) for case in MIXED]
        if order == "reversed":
            jobs = jobs[::-1]
            offline = offline[::-1]
        if order == "staggered":                                 # one image joins the running batch per step
            for job in jobs:
                scheduler.submit([job])
                scheduler.iterate()
            while not all(job.done for job in jobs):
                scheduler.iterate()
        else:
            scheduler.run(jobs)
        assert any(len(lane.slots) == 0 for lane in scheduler.lanes())
        for job, expected in zip(jobs, offline):
            assert job.error is None and job.step == job.num_steps
            np.testing.assert_array_equal(job.tokens, expected.tokens[0])
            np.testing.assert_array_equal(job.image, expected.images[0])
        # both step graphs ran: guidance-0 images in the unguided lane, the rest in the guided one
        assert {name for name, _ in pipe.backend.lanes} == {"step", "step_unguided"}


def test_rows_of_different_steps_share_one_call(tiny):
    """Admitted one step apart, two images run in the same calls afterwards (step-level batching)."""
    with Pipeline.load(tiny) as pipe:
        calls = []
        run = pipe.backend.primitives.run
        pipe.backend.primitives.run = lambda binding: (calls.append(binding), run(binding))
        scheduler = Scheduler(pipe.backend, capacity=4)
        first, second = (_job(pipe, 1, 0, i, dict(num_steps=4)) for i in (0, 1))
        scheduler.submit([first])
        scheduler.iterate()
        scheduler.submit([second])
        scheduler.iterate()
        lane = scheduler.lane(True)
        assert [s.job.step for s in lane.slots] == [2, 1] and (2, 1) in lane.bindings
        assert calls[-1] is lane.bindings[(2, 1)]


def test_cancelled_images_free_their_slots_at_the_next_step(tiny):
    with Pipeline.load(tiny) as pipe:
        scheduler = Scheduler(pipe.backend, capacity=2)
        jobs = [_job(pipe, label, 0, label, dict(num_steps=5)) for label in (1, 2, 3)]
        scheduler.submit(jobs)
        scheduler.iterate()
        assert scheduler.occupied == 2 and scheduler.queued == 1
        scheduler.cancel(jobs[0])
        ended = scheduler.iterate()
        assert jobs[0] in ended and jobs[0].done and jobs[0].image is None
        assert [s.job for s in scheduler.lane(True).slots] == [jobs[1], jobs[2]]    # the waiting one moved in
        while not all(job.done for job in jobs):
            scheduler.iterate()
        expected = _offline(pipe, 3, 0, 3, dict(num_steps=5))
        np.testing.assert_array_equal(jobs[2].tokens, expected.tokens[0])


def test_a_backend_failure_fails_only_the_images_it_touched(tiny):
    with Pipeline.load(tiny) as pipe:
        scheduler = Scheduler(pipe.backend, capacity=2)
        guided = _job(pipe, 1, 0, 0, dict(num_steps=3))
        unguided = _job(pipe, 2, 0, 1, dict(num_steps=3, guidance_scale=0.0))
        lane = scheduler.lane(True)
        step = lane.step
        lane.step = lambda: (_ for _ in ()).throw(RuntimeError("device lost"))
        scheduler.submit([guided, unguided])
        scheduler.iterate()
        assert guided.done and str(guided.error) == "device lost"
        lane.step = step
        while not unguided.done:
            scheduler.iterate()
        assert unguided.error is None
        expected = _offline(pipe, 2, 0, 1, dict(num_steps=3, guidance_scale=0.0))
        np.testing.assert_array_equal(unguided.tokens, expected.tokens[0])
        again = _job(pipe, 1, 0, 0, dict(num_steps=3))
        scheduler.run([again])                                   # the lane serves again
        np.testing.assert_array_equal(again.tokens, _offline(pipe, 1, 0, 0, dict(num_steps=3)).tokens[0])


def test_previews_are_decoded_every_k_steps(tiny):
    with Pipeline.load(tiny) as pipe:
        previews = []
        job = _job(pipe, 1, 0, 0, dict(num_steps=7))
        job.preview_every, job.on_preview = 3, lambda j, image: previews.append((j.step, image))
        Scheduler(pipe.backend).run([job])
        assert [step for step, _ in previews] == [3, 6]
        assert all(image.shape == job.image.shape and image.dtype == np.uint8 for _, image in previews)
        np.testing.assert_array_equal(job.tokens, _offline(pipe, 1, 0, 0, dict(num_steps=7)).tokens[0])


def _to_scalar_settings(bundle, out):
    """A format-2 copy of a bundle: the step graphs take each setting as one scalar for the whole batch (expanded
    to rows inside the graph), as bundles exported before per-row settings did."""
    import shutil
    shutil.copytree(bundle, out)
    manifest = json.loads((out / MANIFEST).read_text())
    for name in ("step", "step_unguided"):
        path = out / manifest["components"][name]["file"]
        model = onnx.load(str(path))
        graph = model.graph
        for node in graph.node:
            node.input[:] = [f"{i}_rows" if i in STEP_SETTINGS else i for i in node.input]
        graph.node.insert(0, helper.make_node("Shape", ["labels"], ["labels_shape"]))
        for setting in STEP_SETTINGS:
            graph.node.insert(1, helper.make_node("Expand", [setting, "labels_shape"], [f"{setting}_rows"]))
            value = next(v for v in graph.input if v.name == setting)
            value.type.tensor_type.shape.ClearField("dim")
        onnx.save(model, str(path))
        entry = manifest["components"][name]
        entry["file_sha256"] = sha256_file(path)
        for tensor in entry["inputs"]:
            if tensor["name"] in STEP_SETTINGS:
                tensor["shape"] = []
    manifest["format_version"] = 2
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def test_format_2_bundles_with_scalar_settings_still_generate(tiny, tmp_path):
    legacy = _to_scalar_settings(tiny, tmp_path / "legacy")
    requests = [([1, 2, 3, 4, 5], dict(num_steps=4)), ([2, 3], dict(num_steps=3, guidance_scale=0.0))]
    with Pipeline.load(tiny) as new, Pipeline.load(legacy) as old:
        assert old.manifest.format_version == 2 and new.manifest.format_version == 3
        for labels, overrides in requests:
            a, b = new.generate(labels, seed=4, **overrides), old.generate(labels, seed=4, **overrides)
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_array_equal(a.images, b.images)
        # a scalar-settings lane admits only images at the same step with the same settings
        scheduler = Scheduler(old.backend, capacity=4)
        jobs = [_job(old, 1, 0, 0, dict(num_steps=3)), _job(old, 2, 0, 1, dict(num_steps=4))]
        scheduler.submit(jobs)
        scheduler.iterate()
        assert [s.job for s in scheduler.lane(True).slots] == jobs[:1]
        while not all(job.done for job in jobs):
            scheduler.iterate()
        np.testing.assert_array_equal(jobs[1].tokens, new.generate([2], seed=0, first_index=1, num_steps=4).tokens[0])


# sha256 (first 16 hex digits) of the demo bundle's tokens and images for labels 0..7, seed 3, first index 5,
# taken with the code before per-row settings and the scheduler (format-2 bundle, staged batch generation)
DEMO_DIGESTS = {
    "default12": (dict(num_steps=12), "47fa9bc1bbb2de28", "2f471036c0de0b26"),
    "unguided8": (dict(num_steps=8, guidance_scale=0.0), "a84de89fbdccf904", "21796af59ee44033"),
    "linear_anneal10": (dict(num_steps=10, guidance_scale=2.0, guidance_annealing="linear", mask_schedule="cosine",
                             randomize_temperature=3.0, softmax_temperature=0.9),
                        "23b823fc901ade1b", "d00764bb3d348209"),
}


@pytest.mark.parametrize("case", sorted(DEMO_DIGESTS))
def test_demo_tokens_are_those_taken_before_the_scheduler(case):
    overrides, tokens, images = DEMO_DIGESTS[case]
    with Pipeline.load(DEMO) as pipe:
        out = pipe.generate(list(range(8)), seed=3, first_index=5, **overrides)
    assert hashlib.sha256(out.tokens.tobytes()).hexdigest()[:16] == tokens
    assert hashlib.sha256(out.images.tobytes()).hexdigest()[:16] == images


def test_a_generation_left_early_frees_its_slots(tiny):
    """Review finding: an exception out of `on_step` (or Ctrl-C) left the call's images in the shared lanes, where
    every later generation kept stepping them."""
    with Pipeline.load(tiny) as pipe:
        def stop(i):
            if i == 1:
                raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            pipe.generate([3, 4, 5], num_steps=8, on_step=stop)
        assert sum(len(lane.slots) for lane in pipe.backend.lanes.values()) == 0
        again = pipe.generate([1, 2], num_steps=4).tokens
    with Pipeline.load(tiny) as fresh:
        np.testing.assert_array_equal(again, fresh.generate([1, 2], num_steps=4).tokens)


def test_a_failing_callback_fails_only_its_own_image(tiny):
    with Pipeline.load(tiny) as pipe:
        scheduler = Scheduler(pipe.backend, capacity=3)
        jobs = [_job(pipe, label, 0, label, dict(num_steps=3)) for label in (1, 2, 3)]
        jobs[1].on_step = lambda job: 1 / 0
        scheduler.submit(jobs)
        while not all(job.done for job in jobs):
            scheduler.iterate()
        assert isinstance(jobs[1].error, ZeroDivisionError) and jobs[1].image is None
        for job in (jobs[0], jobs[2]):
            assert job.error is None
            expected = _offline(pipe, job.label, 0, job.index, dict(num_steps=3))
            np.testing.assert_array_equal(job.tokens, expected.tokens[0])
