"""maskbit-eval tradeoff: the report on a demo bundle made cheap (4 default steps), plan-file checks, and the
"cheapest plan within the default's spread" rule on synthetic numbers."""

import json
import shutil

import pytest
from click.testing import CliRunner

pytest.importorskip("torch_fidelity", reason="the eval extra (torch-fidelity) is not installed")

from bundle_support import edit  # noqa: E402
from maskbit.evaluation.cli import main as eval_cli  # noqa: E402
from maskbit.evaluation.tradeoff import (  # noqa: E402
    DEFAULT,
    METRICS,
    cheapest_within,
    parse_plans,
    within_spread,
)
from maskbit_runtime.cli import DEMO_BUNDLE  # noqa: E402
from maskbit_runtime.sampling import SamplingSettings  # noqa: E402

# the demo's defaults (guidance 1: every step runs the guided graph, two passes) cut to 4 steps
# "again" repeats the default's settings: its seed-0 set is scored by demo_scorer, the default's by evaluate_demo
PLANS = {"short": {"num_steps": 2}, "late_guidance": {"guidance_start": 0.5}, "again": {"num_steps": 4}}
EXPECTED_PASSES = {DEFAULT: 2 * 4, "short": 2 * 2, "late_guidance": 2 + 2 * 2, "again": 2 * 4}
SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    root = shutil.copytree(DEMO_BUNDLE, tmp_path_factory.mktemp("tradeoff") / "bundle")
    edit(root, lambda data: data["sampling"].update(num_steps=4))
    return root


@pytest.fixture(scope="module")
def report(small_bundle, tmp_path_factory):
    """The command's final report, its PNG, its output, and every report it wrote (partials first)."""
    import maskbit.evaluation.cli as cli
    folder = tmp_path_factory.mktemp("out")
    (folder / "plans.json").write_text(json.dumps(PLANS))
    args = ["tradeoff", "--bundle", str(small_bundle), "--plans", str(folder / "plans.json"), "--per-class", "1",
            "--seeds", ",".join(map(str, SEEDS)), "--reference-per-class", "8", "--out", str(folder / "r.json"),
            "--plot", str(folder / "front.png")]
    written, write = [], cli._write_json
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "_write_json", lambda data, out: (written.append(json.loads(json.dumps(data))),
                                                             write(data, out)))
        result = CliRunner().invoke(eval_cli, args)
    assert result.exit_code == 0, result.output
    final = json.loads((folder / "r.json").read_text())
    return final, (folder / "front.png").read_bytes(), result.output, written


def test_report_has_every_plan_seed_and_metric(report):
    data, png, output, _ = report
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert list(data["plans"]) == [DEFAULT, *PLANS]
    assert data["images_per_seed"] == 8 and data["seeds"] == SEEDS and data["complete"]
    assert data["machine"]["isa"] is not None and len(data["machine"]["load_average"]) == 3
    assert data["within_rule"] and data["marked"] in data["plans"]
    assert data["reconstructed"]["fid"] >= 0 and data["real"]["class_accuracy"] >= 0.9
    for name, entry in data["plans"].items():
        assert entry["sampling"] == SamplingSettings.from_dict(entry["sampling"]).to_dict()
        assert entry["overrides"] == ({} if name in (DEFAULT, "again") else PLANS[name]), name
        assert sorted(entry["per_seed"]) == [str(s) for s in SEEDS]
        for seed_report in entry["per_seed"].values():
            assert seed_report["seconds_per_image"] > 0
            assert set(METRICS) <= set(seed_report)
            assert 0 <= seed_report["precision"] <= 1 and 0 <= seed_report["recall"] <= 1
        for metric in METRICS:
            values = [s[metric] for s in entry["per_seed"].values()]
            summary = entry["metrics"][metric]
            assert summary["min"] == min(values) and summary["max"] == max(values)
            assert summary["mean"] == pytest.approx(sum(values) / len(values))
        assert f"{name}: {entry['transformer_passes_per_image']} passes/image" in output
    assert data["plans"][DEFAULT]["within_default_spread"]


def test_passes_follow_the_settings(report):
    plans = report[0]["plans"]
    assert {name: entry["transformer_passes_per_image"] for name, entry in plans.items()} == EXPECTED_PASSES
    assert plans["short"]["passes_saved_vs_default"] == pytest.approx(2)
    # the plans were generated with their own settings: other images, other scores, on every seed
    for seed in map(str, SEEDS):
        assert plans["short"]["per_seed"][seed]["fid"] != plans[DEFAULT]["per_seed"][seed]["fid"]


def test_demo_scorer_scores_like_evaluate_demo(report):
    plans = report[0]["plans"]
    default, again = (dict(plans[name]["per_seed"]["0"]) for name in (DEFAULT, "again"))
    for timing in ("seconds_per_image", "load_average_1min"):
        del default[timing], again[timing]
    assert again == default


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ("{}", "holds no plans"),
    ("[1, 2]", "must be a JSON object"),
    ('{"a": {"num_stepz": 8}}', "unknown sampling setting(s): num_stepz"),
    ('{"a": {"num_steps": 0}}', "num_steps must be in [1,"),
    ('{"a": {"guidance_scale": "high"}}', "guidance_scale must be a number"),
    ('{"a": {"guidance_scale": NaN}}', "guidance_scale must be a finite number"),
    ('{"a": {"mask_schedule": "zigzag"}}', "mask_schedule 'zigzag' is not one of"),
    ('{"a": {"num_steps": null}}', "num_steps is null"),
    ('{"a": {"guidance_start": 0.5, "guidance_stop": 0.5}}', "the guidance interval [0.5, 0.5) holds none"),
    ('{"a": {"num_steps": 2, "guidance_start": 0.7}}', "holds none of the 2 steps"),
    ('{"a": {"guidance_stop": 1.5}}', "guidance_stop must be a finite number in [0, 1]"),
    ('{"a": {"unmask_order": "spiral"}}', "unmask_order 'spiral' is not one of"),
    ('{"a": 32}', "plan 'a' must be an object"),
    ('{"default": {"num_steps": 8}}', "is the bundle's own settings"),
    ('{"": {}}', "plan names are"),
])
def test_bad_plan_files_fail_in_one_line(small_bundle, tmp_path, content, message):
    (tmp_path / "plans.json").write_text(content)
    result = CliRunner().invoke(eval_cli, ["tradeoff", "--bundle", str(small_bundle), "--plans",
                                           str(tmp_path / "plans.json"), "--per-class", "1"])
    assert result.exit_code == 1, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_missing_plans_file_and_one_seed_fail_in_one_line(small_bundle, tmp_path):
    for args, message in ((["--plans", str(tmp_path / "none.json")], "does not exist"),
                          (["--seeds", "3"], "at least 2 distinct seeds"),
                          (["--seeds", "1,x"], "comma-separated integers")):
        result = CliRunner().invoke(eval_cli, ["tradeoff", "--bundle", str(small_bundle), *args])
        assert result.exit_code != 0 and message in result.output, result.output


def test_a_report_after_each_seed_round_but_the_last(report):
    final, _, _, written = report
    assert len(written) == 2 and written[-1] == final
    partial = written[0]
    assert partial["seeds"] == SEEDS[:2] and not partial["complete"] and partial["seeds_planned"] == SEEDS
    for name, entry in partial["plans"].items():
        assert entry["per_seed"] == {str(s): final["plans"][name]["per_seed"][str(s)] for s in SEEDS[:2]}


def test_parse_plans_puts_the_default_first_and_applies_overrides():
    base = SamplingSettings(num_steps=64)
    plans = parse_plans({"half": {"num_steps": 32}, DEFAULT: {}}, base)
    assert list(plans) == [DEFAULT, "half"]
    assert plans[DEFAULT] == base and plans["half"] == SamplingSettings(num_steps=32)


def _entry(passes, fid, precision, recall, seconds=1.0, pixels=None):
    """A plan's entry with the given per-seed values; thumbnail metrics as `pixels` (fid, precision, recall) or,
    by default, the same as the demo network's."""
    summary = lambda values: {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    pixels = pixels or (fid, precision, recall)
    values = dict(zip(("fid", "precision", "recall"), (fid, precision, recall)))
    values.update(zip(("pixels_fid", "pixels_precision", "pixels_recall"), pixels))
    return {"transformer_passes_per_image": passes, "seconds_per_image": {"mean": seconds},
            "metrics": {metric: summary(v) for metric, v in values.items()}}


def test_cheapest_within_spread_on_synthetic_numbers():
    default = _entry(128, [10, 12, 14], [0.6, 0.7, 0.8], [0.3, 0.4, 0.5])
    plans = {DEFAULT: default,
             "fid_too_high": _entry(32, [14, 15, 16], [0.7] * 3, [0.4] * 3),         # mean FID 15 > max 14
             "recall_too_low": _entry(40, [11] * 3, [0.7] * 3, [0.25, 0.3, 0.3]),    # mean recall 0.283 < min 0.3
             "precision_too_low": _entry(44, [11] * 3, [0.5, 0.6, 0.61], [0.4] * 3),
             "thumbnail_recall_too_low": _entry(48, [11] * 3, [0.7] * 3, [0.4] * 3,
                                                pixels=([11] * 3, [0.7] * 3, [0.2] * 3)),
             "within": _entry(64, [13, 14, 15], [0.6] * 3, [0.3] * 3),               # means on the edges
             "better_but_dearer": _entry(96, [5] * 3, [0.9] * 3, [0.9] * 3)}
    assert within_spread(plans["within"]["metrics"], default["metrics"])
    assert within_spread(plans["better_but_dearer"]["metrics"], default["metrics"])
    for name in ("fid_too_high", "recall_too_low", "precision_too_low", "thumbnail_recall_too_low"):
        assert not within_spread(plans[name]["metrics"], default["metrics"]), name
    assert cheapest_within(plans) == "within"
    plans["within_and_faster"] = _entry(64, [12] * 3, [0.7] * 3, [0.4] * 3, seconds=0.5)
    assert cheapest_within(plans) == "within_and_faster"
    assert cheapest_within({DEFAULT: default, "fid_too_high": plans["fid_too_high"]}) == DEFAULT
