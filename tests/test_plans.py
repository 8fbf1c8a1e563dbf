"""Sampling plans: the guidance interval runs the unguided graph exactly outside it (counted calls), the Halton
order and the interval give equal tokens eager and exported, an image that switches lanes equals its offline
generation whatever shares its steps, and bad plans fail in one line."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import maskbit
from maskbit.step import gumbel
from maskbit_export import ExportOptions, build_bundle
from maskbit_runtime import BundleError, InputError, Pipeline
from maskbit_runtime.cli import main as run_cli
from maskbit_runtime.manifest import Manifest
from maskbit_runtime.noise import StepNoise
from maskbit_runtime.sampling import SamplingError, SamplingSettings
from maskbit_runtime.scheduler import ImageJob, Scheduler
from maskbit_runtime.specs import STEP, STEP_UNGUIDED
from maskbit_runtime.unmask_order import halton_ranks, order_noise_scale, order_uniforms

from bundle_support import edit, sharpened_models

PRESETS = ["tiny_lfq10", "tiny_lfq9_g3"]          # two and three groups per token
INTERVAL = dict(num_steps=8, guidance_scale=3.0, guidance_start=0.25, guidance_stop=0.75)
PLANS = {
    "interval": INTERVAL,
    "halton": dict(num_steps=6, guidance_scale=2.0, unmask_order="halton"),
    "halton_interval_linear": dict(num_steps=7, guidance_scale=2.5, guidance_annealing="linear", guidance_start=0.3,
                                   unmask_order="halton", softmax_temperature=0.9),
}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root, built = tmp_path_factory.mktemp("plans"), {}
    for preset in PRESETS:
        tok, gen = sharpened_models(preset)
        build_bundle(root / preset, tok, gen, options=ExportOptions(max_batch=4, verify=False))
        built[preset] = (root / preset, tok, gen)
    return built


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("plan", sorted(PLANS))
def test_eager_and_exported_tokens_are_equal(bundles, preset, plan):
    path, tok, gen = bundles[preset]
    labels = [1, 7, 3]
    eager = maskbit.generate(tok, gen, labels=labels, seed=5, **PLANS[plan])
    with Pipeline.load(path) as pipe:
        exported = pipe.generate(labels, seed=5, **PLANS[plan])
    np.testing.assert_array_equal(exported.tokens, eager.tokens)


def _lane_calls(pipe):
    """Wrap the backend's `run`: the names of the step graphs it ran, in order (decoder calls left out)."""
    calls, run = [], pipe.backend.primitives.run
    pipe.backend.primitives.run = lambda binding: (calls.append(binding), run(binding))[1]

    def names():
        lanes = {id(b): lane.spec.name for lane in pipe.backend.lanes.values() for b in lane.bindings.values()}
        return [lanes[id(b)] for b in calls if id(b) in lanes]
    return names


@pytest.mark.parametrize("overrides", [INTERVAL, dict(num_steps=5, guidance_scale=1.0, guidance_stop=0.5),
                                       dict(num_steps=6), dict(num_steps=4, guidance_scale=0.0)])
def test_the_unguided_graph_runs_exactly_outside_the_interval(bundles, overrides):
    with Pipeline.load(bundles["tiny_lfq10"][0]) as pipe:
        settings = pipe.sampling.with_overrides(**overrides)
        names = _lane_calls(pipe)
        pipe.generate([2], seed=1, **overrides)
        expected = [STEP.name if guided else STEP_UNGUIDED.name for guided in settings.guided_steps()]
        assert names() == expected
        assert sum(2 if name == STEP.name else 1 for name in names()) == settings.transformer_passes()
    if overrides is INTERVAL:            # steps 2..5 of 8 guide (i/8 in [0.25, 0.75))
        assert expected == [STEP_UNGUIDED.name] * 2 + [STEP.name] * 4 + [STEP_UNGUIDED.name] * 2
        assert settings.transformer_passes() == 12 and settings.transformer_passes(has_unguided=False) == 16


def test_a_step_guided_at_scale_0_makes_the_unguided_steps_tokens(bundles):
    """Guided logits are cond + s (cond - uncond): at s = 0 exactly cond, so the annealing's step 0 (scale 0) can
    run unguided for the same tokens (guidance_start = 1/num_steps), one transformer pass saved."""
    path = bundles["tiny_lfq10"][0]
    sessions = [ort.InferenceSession(str(path / f"{name}.onnx"), providers=["CPUExecutionProvider"])
                for name in (STEP.name, STEP_UNGUIDED.name)]
    rng = np.random.default_rng(0)
    for batch, masked in [(1, 1.0), (3, 0.5), (4, 0.1)]:
        tokens = rng.integers(0, 32, (batch, 64, 2))
        tokens[rng.random(tokens.shape) < masked] = 32
        feed = dict(tokens=tokens, labels=rng.integers(0, 10, batch), noise=StepNoise(2, batch, 64, 2).draw(),
                    guidance_scale=np.zeros(batch, np.float32), softmax_temperature=np.ones(batch, np.float32),
                    confidence_noise_scale=np.full(batch, 3.0, np.float32), num_to_mask=np.full(batch, 20))
        guided, unguided = (s.run(None, feed) for s in sessions)
        for a, b in zip(guided, unguided):
            np.testing.assert_array_equal(a, b)
    with Pipeline.load(path) as pipe:
        default = pipe.generate([1, 2], seed=3, num_steps=8)
        free = pipe.generate([1, 2], seed=3, num_steps=8, guidance_start=1 / 8)
    np.testing.assert_array_equal(free.tokens, default.tokens)
    assert SamplingSettings(num_steps=8, guidance_start=1 / 8).transformer_passes() == 15


@pytest.mark.parametrize("groups", [2 * 64, 3 * 64, 2 * 256, 3 * 256, 4096, 1 << 16])
def test_the_halton_rank_outweighs_any_log_p_in_float32(groups):
    """The margin argued in unmask_order.py, computed as the graph computes it (float32 torch): the confidence of
    every position at the worst log p (smallest positive float32) stays above the next one's at log p = 0."""
    scale = torch.tensor(order_noise_scale("halton", groups), dtype=torch.float32)
    u = torch.from_numpy(order_uniforms(np.arange(groups)))               # rank r -> u_r, decreasing
    log_p_low = torch.log(torch.tensor(np.float32(2.0 ** -149), dtype=torch.float32))
    high_first = log_p_low + gumbel(u[:-1]) * scale                        # rank r, as low as log p can make it
    low_next = torch.tensor(0.0) + gumbel(u[1:]) * scale                   # rank r + 1, as high as it can be
    assert log_p_low.item() == pytest.approx(-103.28, abs=0.01)
    assert torch.all(high_first > low_next)
    assert (high_first - low_next).min().item() > 300


@pytest.mark.parametrize("preset", PRESETS)
def test_the_exported_step_unmasks_in_halton_order(bundles, preset):
    """Run the exported step alone: after every step the decided groups are exactly the first ones of the order."""
    path, _, gen = bundles[preset]
    cfg = gen.config
    N, M = cfg.num_tokens, cfg.codebook_splits
    settings = SamplingSettings(num_steps=6, guidance_scale=2.0, unmask_order="halton")
    ranks = halton_ranks(int(N ** 0.5), M)
    assert sorted(ranks.ravel()) == list(range(N * M))
    session = ort.InferenceSession(str(path / "step.onnx"), providers=["CPUExecutionProvider"])
    tokens = np.full((2, N, M), cfg.mask_token)
    noise = StepNoise(9, 2, N, M, confidence=settings.order_noise(N, M))
    for params in settings.plan(N * M)[:-1]:
        row = lambda value, dtype=np.float32: np.full(2, value, dtype)
        tokens, _ = session.run(None, dict(
            tokens=tokens, labels=np.array([1, 4]), noise=noise.draw(), guidance_scale=row(params.guidance_scale),
            softmax_temperature=row(params.softmax_temperature),
            confidence_noise_scale=row(params.confidence_noise_scale), num_to_mask=row(params.num_to_mask, np.int64)))
        decided = N * M - params.num_to_mask
        for image in tokens:
            np.testing.assert_array_equal(image != cfg.mask_token, ranks < decided)


def test_halton_keeps_the_class_draws_of_the_seed():
    plain = StepNoise(4, 2, 16, 2).draw()
    halton = SamplingSettings(unmask_order="halton").order_noise(16, 2)
    ordered = StepNoise(4, 2, 16, 2, confidence=halton).draw()
    np.testing.assert_array_equal(ordered[..., 0], plain[..., 0])
    np.testing.assert_array_equal(ordered[..., 1], np.broadcast_to(halton, (2, 16, 2)))
    assert not np.array_equal(StepNoise(5, 2, 16, 2, confidence=halton).draw()[..., 0], plain[..., 0])


SWITCHING = [   # (label, seed, index, settings overrides): lane switches among images that never switch
    (1, 0, 0, dict(num_steps=6, guidance_start=0.3, guidance_stop=0.7)),
    (2, 0, 1, dict(num_steps=3, guidance_scale=0.0)),
    (3, 5, 7, dict(num_steps=9, guidance_annealing="linear", guidance_scale=2.5, guidance_start=0.5)),
    (4, 1, 2, dict(num_steps=5, unmask_order="halton", guidance_stop=0.4)),
    (5, 2, 0, dict(num_steps=6)),
    (6, 0, 3, dict(num_steps=4, guidance_stop=0.5, unmask_order="halton")),
    (7, 9, 4, dict(num_steps=5, guidance_scale=1.0)),
]


@pytest.mark.parametrize("order", ["given", "staggered"])
def test_images_that_switch_lanes_equal_their_offline_generations(bundles, order):
    with Pipeline.load(bundles["tiny_lfq10"][0]) as pipe:
        offline = [pipe.generate([label], seed=seed, first_index=index, **o) for label, seed, index, o in SWITCHING]
        scheduler = Scheduler(pipe.backend, capacity=3)
        jobs = [ImageJob(label, seed, index, pipe.sampling.with_overrides(**o)) for label, seed, index, o in SWITCHING]
        moves, move = [], type(scheduler.lane(True)).move
        for lane in (scheduler.lane(True), scheduler.lane(False)):
            lane.move = lambda rows, target, lane=lane: (moves.append(len(rows)), move(lane, rows, target))
        if order == "given":
            scheduler.submit(jobs)
        iteration = 0
        while not all(job.done for job in jobs):
            if order == "staggered":                      # one image joins the running ones per step
                scheduler.submit(jobs[iteration:iteration + 1])
            scheduler.iterate()
            iteration += 1
            for guided in (True, False):      # rows held for images that will move in: never over capacity
                assert scheduler._load(guided) <= scheduler.capacity
        assert sum(moves) >= 5
        for job, expected in zip(jobs, offline):
            assert job.error is None and job.step == job.num_steps
            np.testing.assert_array_equal(job.tokens, expected.tokens[0])
            np.testing.assert_array_equal(job.image, expected.images[0])


def test_scalar_settings_bundles_switch_lanes_batch_at_a_time(bundles, tmp_path):
    from test_scheduler import _to_scalar_settings
    legacy = _to_scalar_settings(bundles["tiny_lfq10"][0], tmp_path / "legacy")
    with Pipeline.load(bundles["tiny_lfq10"][0]) as new, Pipeline.load(legacy) as old:
        for overrides in (INTERVAL, dict(num_steps=5, guidance_stop=0.5, unmask_order="halton")):
            labels = [1, 2, 3, 4, 5]
            a, b = new.generate(labels, seed=4, **overrides), old.generate(labels, seed=4, **overrides)
            np.testing.assert_array_equal(a.tokens, b.tokens)
        scheduler = Scheduler(old.backend, capacity=4)
        jobs = [ImageJob(1, 0, 0, old.sampling.with_overrides(**INTERVAL)),
                ImageJob(2, 0, 1, old.sampling.with_overrides(num_steps=3))]
        scheduler.submit(jobs)
        scheduler.iterate()   # the interval image starts unguided and holds the whole guided lane, where it moves
        assert [s.job for s in scheduler.lane(False).slots] == jobs[:1] and jobs[1] in scheduler.waiting[True]
        while not all(job.done for job in jobs):
            scheduler.iterate()
        for job in jobs:
            expected = new.generate([job.label], seed=0, first_index=job.index, **job.settings.to_dict())
            np.testing.assert_array_equal(job.tokens, expected.tokens[0])


@pytest.mark.parametrize("overrides, words", [
    (dict(guidance_start=0.5, guidance_stop=0.5), "holds none of the 64 steps"),
    (dict(guidance_start=0.7, guidance_stop=0.3), "holds none of the 64 steps"),
    (dict(num_steps=4, guidance_start=0.8), "holds none of the 4 steps"),
    (dict(guidance_stop=1.5), "guidance_stop must be a finite number in [0, 1]"),
    (dict(guidance_start=-0.1), "guidance_start must be a finite number in [0, 1]"),
    (dict(unmask_order="raster"), "unmask_order 'raster' is not one of confidence, halton"),
])
def test_bad_plans_fail_in_one_line(overrides, words):
    with pytest.raises(SamplingError) as error:
        SamplingSettings().with_overrides(**overrides)
    assert words in str(error.value) and "\n" not in str(error.value)
    assert isinstance(error.value, InputError)


FAST = {"num_steps": 4, "guidance_start": 0.25, "unmask_order": "halton"}


def _with_plans(root, plans):
    edit(root, lambda data: data.update(plans=plans))
    return root


def test_a_bundle_records_named_plans_and_generate_picks_one(bundles, tmp_path):
    import shutil
    root = _with_plans(Path(shutil.copytree(bundles["tiny_lfq10"][0], tmp_path / "b")), {"fast": FAST})
    manifest = Manifest.load(root)
    assert manifest.plan("fast") == manifest.sampling.with_overrides(**FAST) and manifest.plan() == manifest.sampling
    with Pipeline.load(root, plan="fast") as pipe:
        assert pipe.sampling.num_steps == 4 and pipe.sampling.unmask_order == "halton"
        planned = pipe.generate([1, 2], seed=3).tokens
        np.testing.assert_array_equal(planned, pipe.use_plan(None).generate([1, 2], seed=3, **FAST).tokens)
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(run_cli, ["generate", "--bundle", str(root), "--labels", "1,2", "--plan", "fast",
                                          "--out", str(out)])
    assert result.exit_code == 0, result.output
    with Pipeline.load(root) as pipe:
        assert np.array_equal(np.asarray(Image.open(out)), _grid(pipe.generate([1, 2], seed=0, **FAST).images))
    recorded = manifest.with_plan("slow", {"num_steps": 12})
    recorded.write()
    assert Manifest.load(root).plans == {"fast": FAST, "slow": {"num_steps": 12}}


def _grid(images):
    from maskbit_runtime.images import save_images
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        save_images(images, Path(folder) / "g.png")
        return np.asarray(Image.open(Path(folder) / "g.png"))


def test_an_unknown_plan_name_fails_in_one_line_listing_the_names(bundles, tmp_path):
    import shutil
    root = _with_plans(Path(shutil.copytree(bundles["tiny_lfq10"][0], tmp_path / "b")), {"fast": FAST, "a": {}})
    with pytest.raises(InputError, match=r"has no plan 'quick'; its plans: a, fast$"):
        Pipeline.load(root, plan="quick")
    result = CliRunner().invoke(run_cli, ["generate", "--bundle", str(root), "--labels", "1", "--plan", "quick"])
    assert result.exit_code == 1 and result.output.strip().endswith("has no plan 'quick'; its plans: a, fast")
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("plans, words", [
    ({"fast": {"guidance_start": 0.9, "num_steps": 4}}, "plan fast: the guidance interval [0.9, 1) holds none"),
    ({"fast": {"unmask_order": "spiral"}}, "plan fast: unmask_order 'spiral' is not one of confidence, halton"),
    ({"fast": {"speed": 2}}, "plan fast: unknown sampling setting(s) speed"),
    ({"fast": {"guidance_stop": None}}, "plan fast: guidance_stop must be a number, got None"),
    ({"fast": ["num_steps", 4]}, "plan fast must be an object of sampling settings"),
    ({"../x": {}}, "plan name '../x' must be 1-64 letters"),
    ([{"num_steps": 4}], "plans must be dict"),
    ({f"p{i}": {} for i in range(65)}, "65 plans; at most 64"),
])
def test_bad_plans_in_a_manifest_fail_in_one_line(bundles, tmp_path, plans, words):
    import shutil
    root = _with_plans(Path(shutil.copytree(bundles["tiny_lfq10"][0], tmp_path / "b")), plans)
    with pytest.raises(BundleError) as error:
        Manifest.load(root)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_sample_run_ids_of_runs_made_before_the_plan_settings_are_kept():
    """A sample run's id hashes its settings' identity: without the plan fields while they hold their defaults (a
    run folder made before they existed still resumes), with them when a plan changes them."""
    before = {"num_steps", "guidance_scale", "guidance_annealing", "scale_pow", "softmax_temperature",
              "randomize_temperature", "mask_schedule", "use_sampling_annealing"}
    assert set(SamplingSettings().identity()) == before
    planned = SamplingSettings(guidance_stop=0.5, unmask_order="halton").identity()
    assert set(planned) == before | {"guidance_stop", "unmask_order"}


def test_a_server_on_a_plan_serves_the_offline_images(bundle):
    """The demo bundle served with a recorded plan (--plan): concurrent requests, some switching lanes, some on the
    plan's defaults, equal the offline images of the same plan byte for byte."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    import asyncio

    from serve_support import ThreadServer
    _with_plans(bundle, {"fast": {"num_steps": 6, "guidance_start": 0.5, "unmask_order": "halton"}})
    bodies = [{"labels": [1, 2], "seed": 3}, {"labels": [4], "guidance_scale": 0.0},
              {"labels": [5, 6], "seed": 1, "num_steps": 5, "unmask_order": "confidence", "guidance_stop": 0.9},
              {"labels": [0], "first_index": 2}]

    async def send_all(url):
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(f"{url}/v1/generate", json={**b, "format": "tokens"})
                                          for b in bodies))

    with ThreadServer(bundles={"demo": bundle}, max_batch=3, request_timeout=60) as server:
        server.pipe.use_plan("fast")
        responses = asyncio.run(send_all(server.url))
    with Pipeline.load(bundle, plan="fast") as offline:
        for body, response in zip(bodies, responses):
            assert response.status_code == 200, response.text
            settings = {k: v for k, v in body.items() if k not in ("labels", "seed", "first_index")}
            expected = offline.generate(body["labels"], seed=body.get("seed", 0),
                                        first_index=body.get("first_index", 0), **settings).tokens
            answer = response.json()
            assert answer["settings"] == offline.sampling.with_overrides(**settings).to_dict()
            np.testing.assert_array_equal(np.array([item["tokens"] for item in answer["images"]]), expected)


def test_an_image_waiting_for_a_reserved_row_is_not_passed_by_later_ones(bundles):
    """An image that starts unguided and will move to the guided lane waits for a guided row to reserve; under a
    steady stream of guided images the rows freed there go to it first (the guided lane admits nobody meanwhile)."""
    with Pipeline.load(bundles["tiny_lfq10"][0]) as pipe:
        scheduler = Scheduler(pipe.backend, capacity=2)
        guided = lambda i: ImageJob(1, 0, i, pipe.sampling.with_overrides(num_steps=3))
        switching = ImageJob(2, 0, 0, pipe.sampling.with_overrides(num_steps=4, guidance_start=0.5))
        stream = [guided(i) for i in range(30)]
        scheduler.submit(stream[:2])
        scheduler.iterate()
        scheduler.submit([switching])
        for i in range(2, 30):
            scheduler.submit([stream[i]])
            scheduler.iterate()
            if switching.done:
                break
        assert switching.done and switching.error is None and i < 12
        expected = pipe.generate([2], seed=0, num_steps=4, guidance_start=0.5).tokens[0]
        np.testing.assert_array_equal(switching.tokens, expected)
