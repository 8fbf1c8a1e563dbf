"""Loaded weights and settings: tensors of another dtype kind, NaN/infinite weights, non-finite training settings
and hub references that climb out of the cache are each one clear error (CheckpointError / ConfigError)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import maskbit
from maskbit.checkpoints import CheckpointError, load_into, resolve_hub
from maskbit.config import ConfigError
from maskbit.train.settings import build_settings


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    return maskbit.build_generator("tiny_lfq10")


def _state(model, change):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 2)
    state[key] = change(state[key])
    return state, key


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_tensors_into_float_parameters_are_refused(generator, dtype):
    state, key = _state(generator, lambda t: torch.ones_like(t, dtype=dtype))
    with pytest.raises(CheckpointError, match=rf"1 of another dtype kind \({key} torch\.\w+ into torch.float32\)"):
        load_into(generator, state, "x.safetensors", "tiny_lfq10")    # the old code cast them silently


def test_other_float_precisions_still_load(generator):
    state, _ = _state(generator, lambda t: t.to(torch.bfloat16))
    load_into(generator, state, "x.safetensors", "tiny_lfq10")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_refused(generator, value):
    state, key = _state(generator, lambda t: t.index_fill(0, torch.tensor([0]), value))
    with pytest.raises(CheckpointError, match=f"NaN or infinite weights in 1 tensor\\(s\\) \\({key}\\)"):
        load_into(generator, state, "x.safetensors", "tiny_lfq10")


@pytest.mark.parametrize("ref", ["hf://../../etc/passwd", "hf://owner/../../x", "hf://./repo/f", "hf://a b/c",
                                 "hf://owner/repo/../../../etc/passwd", "hf://" + "a" * 200 + "/b"])
def test_hub_references_that_leave_the_cache_are_one_line(ref):
    with pytest.raises(CheckpointError, match="must look like hf://owner/repo") as error:
        resolve_hub(ref)                      # the old code: HFValidationError traceback (or a path through '..')
    assert len(str(error.value).splitlines()) == 1


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", ".nan", "1e999"])
def test_non_finite_training_settings_are_one_line(text):
    config = maskbit.get_preset("tiny_lfq10")
    with pytest.raises(ConfigError, match="learning_rate expects a float"):
        build_settings(config, "generator", {"learning_rate": float(text) if text != ".nan" else math.nan})


@settings(max_examples=40, deadline=None)
@given(value=st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6) | st.booleans())
def test_any_learning_rate_is_a_finite_float_or_refused(value):
    config = maskbit.get_preset("tiny_lfq10")
    try:
        result = build_settings(config, "generator", {"learning_rate": value})
    except ConfigError as exc:
        assert len(str(exc).splitlines()) == 1
    else:
        assert math.isfinite(result.learning_rate) and not isinstance(value, bool)
