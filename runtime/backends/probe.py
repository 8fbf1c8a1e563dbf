"""What a component does, checked on a small known input when a backend opens it.

Tensor names, dtypes and fixed axes (`base.check_component_io`) cannot show what a graph computes: a combine graph
whose output shape depends on its data, a step graph whose class embedding is smaller than the manifest's
`num_classes`, or the guided and unguided steps swapped (with their hashes updated) all pass them, and then fail
mid-generation with ONNX Runtime's traceback or, worse, run silently without guidance. So, once per component:
- combine turns a known grid of groups into its token indices (`tokens.combine_groups`), in the manifest's shape;
- a step embeds label `num_classes` (the unconditional row, the class embedding's last): a manifest that
  declares more classes than the graph has fails here;
- the guided step's result changes with `guidance_scale` and the unguided step's does not (its contract: accepted
  and ignored).
Each probe runs the component at the batch profile's smallest batch; `run` maps input arrays to output arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from ..manifest import Manifest
from ..specs import (COMBINE, CONFIDENCE_NOISE_SCALE, GROUPS, GUIDANCE_SCALE, INDICES, LABELS, NOISE, NUM_TO_MASK,
                     SAMPLED, SOFTMAX_TEMPERATURE, STEP, STEP_UNGUIDED, TOKENS)
from ..tokens import combine_groups, split_groups
from .base import BackendError

Run = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]
GUIDANCE = 50.0                 # large, so that any difference between cond and uncond logits moves some draws
NOT_OURS = "the file does not belong to this bundle"


def probe(manifest: Manifest, component: str, run: Run, where: str,
          open_component: Callable[[str], object] | None = None) -> None:
    """Run the checks above that concern `component` (others have none); BackendError on the first that fails.
    `open_component(name)` opens (and so probes) another component: a guided step whose result does not move
    with guidance is accepted only when the bundle's unguided step does not apply guidance either (a model whose
    class conditioning has no effect, such as one without transformer layers) and is not the same file."""
    if component == COMBINE.name:
        _probe_combine(manifest, run, where)
    elif component in (STEP.name, STEP_UNGUIDED.name):
        _probe_step(manifest, component, run, where, open_component)


def _call(manifest: Manifest, component: str, run: Run, where: str, feeds: Mapping[str, np.ndarray],
          failure: str) -> dict[str, np.ndarray]:
    """Run once; every output must have the shape and dtype the manifest's dims give for this batch."""
    try:
        outputs = dict(run(feeds))
    except Exception as exc:  # ONNX Runtime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendError(f"{where} {failure}: {first:.300}") from None
    batch = len(next(iter(feeds.values())))
    for t in manifest.spec(component).outputs:
        want = manifest.dims.resolve(t.shape, batch)
        got = np.asarray(outputs[t.name])
        if got.shape != want or got.dtype != np.dtype(t.dtype):
            raise BackendError(f"{where} makes {t.name} of shape {list(got.shape)} ({got.dtype}) from a batch of "
                               f"{batch}, but the manifest's dims give {list(want)} ({t.dtype}); {NOT_OURS}")
    return outputs


def _probe_combine(manifest: Manifest, run: Run, where: str) -> None:
    d, batch = manifest.dims, manifest.component(COMBINE.name).batch_profile.min
    indices = (np.arange(batch * d.num_tokens, dtype=np.int64) * 7919 + 13) % manifest.codebook_size
    groups = split_groups(indices, manifest.num_bits, d.num_groups).reshape(batch, d.num_tokens, d.num_groups)
    got = _call(manifest, COMBINE.name, run, where, {GROUPS: groups}, "cannot combine a grid of groups")[INDICES]
    expected = combine_groups(groups, manifest.num_bits).reshape(got.shape)
    if not np.array_equal(got, expected):
        raise BackendError(f"{where} does not turn groups into this bundle's token indices ({np.sum(got != expected)} "
                           f"of {got.size} differ on a known grid); {NOT_OURS}")


def _step_feeds(manifest: Manifest, component: str, label: int, guidance: float) -> dict[str, np.ndarray]:
    """Every group masked, fixed noise in (0, 1), temperature 1, no confidence noise, nothing re-masked."""
    d, spec = manifest.dims, manifest.spec(component)
    batch = manifest.component(component).batch_profile.min
    values = {TOKENS: d.group_classes, LABELS: label, GUIDANCE_SCALE: guidance, SOFTMAX_TEMPERATURE: 1.0,
              CONFIDENCE_NOISE_SCALE: 0.0, NUM_TO_MASK: 0}
    feeds = {t.name: np.full(d.resolve(t.shape, batch), values[t.name], t.dtype) for t in spec.inputs
             if t.name != NOISE}
    noise = spec.input(NOISE)
    feeds[NOISE] = np.random.default_rng(0).uniform(0.01, 0.99, d.resolve(noise.shape, batch)).astype(noise.dtype)
    return feeds


def _probe_step(manifest: Manifest, component: str, run: Run, where: str,
                open_component: Callable[[str], object] | None) -> None:
    def sampled(label: int, guidance: float, failure: str) -> np.ndarray:
        feeds = _step_feeds(manifest, component, label, guidance)
        return _call(manifest, component, run, where, feeds, failure)[SAMPLED]

    plain = sampled(0, 0.0, "cannot run one step on a masked grid")
    classes = manifest.num_classes
    sampled(classes, 0.0, f"cannot embed label {classes}, the unconditional one after the manifest's num_classes "
                          f"= {classes}: its class embedding is smaller, so the manifest declares more classes than "
                          f"the graph has ({NOT_OURS})")
    guided = sampled(0, GUIDANCE, "cannot run one step with guidance")
    if component == STEP.name and np.array_equal(plain, guided) and STEP_UNGUIDED.name in manifest.components:
        guided_entry, unguided_entry = manifest.component(STEP.name), manifest.component(STEP_UNGUIDED.name)
        if guided_entry.file_sha256 == unguided_entry.file_sha256:
            raise BackendError(f"{where} ignores guidance_scale ({GUIDANCE} gives what 0 gives) and is the same file "
                               f"as {STEP_UNGUIDED.name}, so it is not a guided step; {NOT_OURS}")
        if open_component is not None:
            open_component(STEP_UNGUIDED.name)     # raises if that one applies guidance: the two were swapped
    if component == STEP_UNGUIDED.name and not np.array_equal(plain, guided):
        raise BackendError(f"{where} applies guidance_scale, so it is a guided step, not {STEP_UNGUIDED.name} "
                           f"(were the two swapped?); {NOT_OURS}")
