"""AOTInductor primitives: one compiled `.pt2` package per component, torch tensors on one device as buffers.

The slot scheduler (`maskbit_runtime.scheduler`) drives these like the other backends: its step bindings differ
in how many slot rows they cover and in which token tensor is `tokens` and which `next_tokens`, so the state stays
on the device and ping-pongs. A compiled package returns new tensors, so `run` copies them into the bound output
buffers (`copy_`, on the device). A range of rows (`rows`) is a torch view, read in place; `copy` moves rows on
the device. On a GPU, uploads from the staging arrays (pinned memory) are asynchronous and downloads wait once,
and `cuda_graphs=True` captures each step binding (the package call and its copies) once and replays it: a
binding always reads the same tensors, so nothing is copied into fixed inputs first.

Graph replay needs packages loaded with `run_single_threaded=True` (PyTorch PR #148601): the default, threaded
runtime queries a CUDA event before each call, which capture forbids. Host waits are counted for every generation,
whoever makes them (`describe()["host_syncs"]` says how): this backend's own (the download's stream
synchronization, pageable uploads, staging still in flight) and the package runtime's, read from
torch/csrc/inductor/aoti_runtime (model_container.h): the first call of each loaded package folds its constants
and waits for them, and a threaded package on CUDA waits for its previous call before each call unless that has
finished, which `WaitCounter` sees with an event recorded after each call and queried before the next.

Packages are tied to the PyTorch version that compiled them and to their device (cpu or cuda); the manifest's
record of both is compared with this process before any package is loaded. This backend is torch-based, so it
lives here, with the exporter, rather than in `maskbit_runtime`, which never imports torch: `open_backend("aoti")`
finds it through the `maskbit_runtime.backends` entry point, and torch is imported only then.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from maskbit_runtime.backends.base import CUDA_GRAPHS, BackendError, Transfers, check_built
from maskbit_runtime.errors import MissingDependencyError
from maskbit_runtime.manifest import Manifest

DEVICES = ("cpu", "cuda")
PACKAGE_KEYS = ("package", "package_sha256", "package_precision", "package_device", "torch_version")
BUILD = "maskbit-export build-engines --backend aoti"
REBUILD = f"rebuild with {BUILD}"
COMPONENT_KEY = "maskbit_component"     # package metadata written by maskbit_export.aoti
EXTRACTED_PREFIX = "aotinductor_"       # the package loader's folder in the temporary directory
CPU_SYNCS = "none: on the CPU nothing runs asynchronously"
CUDA_SYNCS = ("the host's waits per generation: the download's stream synchronization, an upload from pageable "
              "memory, a staging buffer whose last copy is still in flight, the first call of each loaded package "
              "(its runtime folds constants and waits for them){threaded}")
THREADED_SYNCS = (", and each call of a threaded package (loaded without run_single_threaded: no CUDA graphs) "
                  "whose previous call had not finished when it began (the runtime waits for it; seen with an "
                  "event recorded after each call and queried before the next)")


def import_torch():
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("the AOTInductor backend needs PyTorch: pip install 'maskbit[torch]'") from None
    return torch


def check_packages(manifest: Manifest, torch_version: str, device: str) -> None:
    """Raise BackendError unless every component the runtime needs has a package for this torch and device."""
    def mismatch(entry) -> str | None:
        if entry.torch_version == torch_version and entry.package_device == device:
            return None
        return (f"package {entry.package} was compiled for {entry.package_device} with torch {entry.torch_version}, "
                f"but this is {device} with torch {torch_version}")

    check_built(manifest, "package", "AOTInductor package", BUILD, mismatch)


def default_device(manifest: Manifest) -> str:
    """The device the bundle's packages were compiled for (all of them must agree)."""
    devices = sorted({e.package_device for e in manifest.components.values() if e.package is not None})
    if len(devices) > 1:
        raise BackendError(f"bundle {manifest.root} mixes packages for {' and '.join(devices)}; {REBUILD}")
    return devices[0] if devices else "cpu"


def temp_root() -> Path:
    """Where the package loader extracts packages: C++ `std::filesystem::temp_directory_path()`'s choice."""
    for name in ("TMPDIR", "TMP", "TEMP", "TEMPDIR"):
        if os.environ.get(name):
            return Path(os.environ[name])
    return Path("/tmp")


def extracted_folders() -> set[str]:
    try:
        return {p.name for p in temp_root().glob(f"{EXTRACTED_PREFIX}*")}
    except OSError:
        return set()


def remove_failed_extractions(before: set[str], package: Path) -> None:
    """Remove the folders a failed load extracted `package` into (the loader removes its folder when a loaded
    package is freed, never when loading fails): folders new since `before` that hold this package's top-level
    folder, so another process's extraction of another package is left alone."""
    try:
        with zipfile.ZipFile(package) as zf:
            tops = {name.split("/", 1)[0] for name in zf.namelist() if "/" in name}
    except (OSError, zipfile.BadZipFile):
        tops = set()
    for name in extracted_folders() - before:
        folder = temp_root() / name
        if tops and any((folder / top).is_dir() for top in tops):
            shutil.rmtree(folder, ignore_errors=True)


class AotiPrimitives:
    name = "aoti"

    def __init__(self, manifest: Manifest, device: str | None = None, cuda_graphs: bool = CUDA_GRAPHS):
        self.torch = torch = import_torch()
        device = device or default_device(manifest)
        if device not in DEVICES:
            raise BackendError(f"AOTInductor device {device!r} is not supported; expected one of {', '.join(DEVICES)}")
        check_packages(manifest, torch.__version__, device)
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendError("the bundle's AOTInductor packages are compiled for cuda, but PyTorch sees no CUDA "
                               "GPU here; rebuild with --aoti-device cpu to run on the CPU")
        self.manifest = manifest
        self.device = torch.device(device)
        self.cuda_graphs = bool(cuda_graphs) and device == "cuda"
        self.single_threaded = self.cuda_graphs        # capture forbids the threaded runtime's event queries
        self.graphs_off: dict[str, str] = {}           # component -> why its capture failed
        self.transfers = Transfers()
        self._packages: dict[str, Any] = {}
        self._staging: dict[int, Staging] = {}
        self._readback: dict[int, Staging] = {}
        self._graphs: dict[tuple, Any] = {}

    def package(self, component: str):
        if component not in self._packages:
            path = self.manifest.file(component, "package")        # confined and hash-checked first
            before = extracted_folders()
            try:
                runner = self.torch._inductor.aoti_load_package(
                    str(path), run_single_threaded=self.single_threaded,
                    device_index=(self.device.index or 0) if self.device.type == "cuda" else -1)
            except Exception as exc:  # the loader raises RuntimeError with a C++ message
                remove_failed_extractions(before, path)
                raise BackendError(f"AOTInductor cannot load {path.name}: {str(exc).splitlines()[0]}; "
                                   f"{REBUILD}") from None
            found = runner.get_metadata().get(COMPONENT_KEY)
            if found != component:
                raise BackendError(f"{path.name} holds component {found!r}, not {component!r}; the file does not "
                                   f"belong to this bundle")
            if self.device.type == "cuda":
                runner = WaitCounter(runner, self.transfers, None if self.single_threaded else self.torch.cuda.Event)
            self._packages[component] = runner
        return self._packages[component]

    def allocate(self, shape: tuple[int, ...], dtype: str):
        return self.torch.empty(shape, dtype=getattr(self.torch, np.dtype(dtype).name), device=self.device)

    def rows(self, buffer, start: int, count: int):
        if buffer.dim() == 0 or not (start >= 0 and count >= 1 and start + count <= buffer.shape[0]):
            raise ValueError(f"rows {start}..{start + count - 1} do not exist in a buffer of shape "
                             f"{list(buffer.shape)}")
        return buffer[start:start + count]

    def copy(self, target, source) -> None:
        if target.shape != source.shape or target.dtype != source.dtype:
            raise ValueError(f"cannot copy {source.dtype} {list(source.shape)} into {target.dtype} "
                             f"{list(target.shape)}")
        target.copy_(source)                  # queued on the current stream, in order with the runs
        self.transfers.device_to_device += 1

    def staging(self, buffer) -> np.ndarray:
        staging = self._staging_for(self._staging, buffer)
        if staging.wait():
            self.transfers.host_syncs += 1
        return staging.array

    def upload(self, buffer, array: np.ndarray) -> None:
        if tuple(array.shape) != tuple(buffer.shape):
            raise BackendError(f"cannot upload an array of shape {list(array.shape)} into a buffer of shape "
                               f"{list(buffer.shape)}")
        staging = self._staging.get(id(buffer))
        if staging is not None and array is staging.array:
            staging.copy(buffer, staging.host)        # asynchronous from pinned memory on CUDA
        else:
            buffer.copy_(self.torch.as_tensor(array))      # as_tensor keeps 0-d scalars 0-d
            if self.device.type == "cuda":
                self.transfers.host_syncs += 1          # from pageable memory, torch waits for the stream
        self.transfers.host_to_device += 1

    def download(self, *buffers) -> list[np.ndarray]:
        self.transfers.device_to_host += len(buffers)
        if self.device.type != "cuda":
            return [buffer.numpy().copy() for buffer in buffers]     # on the CPU the buffer itself: copy
        hosts = [self._staging_for(self._readback, buffer) for buffer in buffers]
        for buffer, host in zip(buffers, hosts):
            host.copy(host.host, buffer)
        self.torch.cuda.current_stream(self.device).synchronize()
        self.transfers.host_syncs += 1
        return [host.array.copy() for host in hosts]

    def _staging_for(self, table: dict[int, Staging], buffer) -> Staging:
        if id(buffer) not in table:
            table[id(buffer)] = Staging(self.torch, buffer)
        return table[id(buffer)]

    def bind(self, component: str, buffers: Mapping[str, Any]) -> Binding:
        spec = self.manifest.spec(component)
        return Binding(component, self.package(component), [buffers[t.name] for t in spec.inputs],
                       [buffers[t.name] for t in spec.outputs])

    def run(self, binding: Binding) -> None:
        if self.cuda_graphs and self.manifest.spec(binding.component).graphed and \
                binding.component not in self.graphs_off:
            self._replay(binding)
        else:
            with self.torch.inference_mode():
                binding.call(binding.inputs)

    def _replay(self, binding: Binding) -> None:
        torch = self.torch
        inputs = binding.inputs             # fixed addresses: each binding is made once and reused
        key = (binding.component, *((t.data_ptr(), tuple(t.shape)) for t in inputs + binding.outputs))
        if key not in self._graphs:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), torch.inference_mode():
                binding.call(inputs)                                 # warm-up: loads kernels, sizes the workspace
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph), torch.inference_mode():
                    binding.call(inputs)
            except RuntimeError as exc:      # capture refused: this component runs plainly from now on
                self.graphs_off[binding.component] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                with torch.inference_mode():
                    binding.call(inputs)
                return
            self._graphs[key] = graph
        self._graphs[key].replay()

    def describe(self) -> dict:
        torch = self.torch
        cuda = self.device.type == "cuda"
        info = {"backend": self.name, "torch": torch.__version__, "device": str(self.device),
                "cuda_graphs": (("off for " + "; ".join(f"{k}: {v}" for k, v in self.graphs_off.items()))
                                if self.graphs_off else "on" if self.cuda_graphs else "off"),
                "run_single_threaded": self.single_threaded,
                "host_syncs": CUDA_SYNCS.format(threaded="" if self.single_threaded else THREADED_SYNCS) if cuda
                else CPU_SYNCS,
                "packages": {k: v.package for k, v in self.manifest.components.items() if v.package}}
        if self.device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(self.device)
        return info

    def close(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)
        self._graphs.clear()
        self._packages.clear()
        self._staging.clear()
        self._readback.clear()


class Staging:
    """A host copy of one buffer for uploads or downloads: pinned memory on CUDA, with an event that marks the
    last asynchronous copy; a plain numpy array on the CPU."""

    def __init__(self, torch, buffer):
        cuda = buffer.device.type == "cuda"
        self.host = torch.empty(buffer.shape, dtype=buffer.dtype, pin_memory=cuda)
        self.array = self.host.numpy()                  # the same memory
        self.event = torch.cuda.Event() if cuda else None

    def copy(self, target, source) -> None:
        target.copy_(source, non_blocking=self.event is not None)
        if self.event is not None:
            self.event.record()

    def wait(self) -> bool:
        """Block until the last copy from or into the host memory has finished; True when the host had to wait."""
        if self.event is None or self.event.query():
            return False
        self.event.synchronize()
        return True


class WaitCounter:
    """A CUDA package's runner that counts the waits its runtime makes on the host (model_container.h): the first
    call folds the constants and waits for them; a threaded runner (`event` given: a CUDA event class) then waits
    before each call for its previous call unless that has finished. An event recorded just after each call and
    queried just before the next tells whether it had; single-threaded runners make no other waits."""

    def __init__(self, runner, transfers: Transfers, event=None):
        self.runner = runner
        self.transfers = transfers
        self.event = event
        self.finished = None            # the event recorded after the last call
        self.calls = 0

    def __call__(self, *inputs):
        if self.calls == 0 or (self.finished is not None and not self.finished.query()):
            self.transfers.host_syncs += 1
        self.calls += 1
        results = self.runner(*inputs)
        if self.event is not None:
            self.finished = self.finished or self.event()
            self.finished.record()
        return results

    def get_metadata(self) -> dict:
        return self.runner.get_metadata()


class Binding:
    """A component's package with its input and output buffers; `call` runs it and copies the outputs in."""

    def __init__(self, component: str, runner, inputs: list, outputs: list):
        self.component = component
        self.runner = runner
        self.inputs = inputs
        self.outputs = outputs

    def call(self, inputs: list) -> None:
        """Run the package on `inputs` (the bound ones, or fixed copies of them) into the bound outputs."""
        results = self.runner(*inputs)
        results = (results,) if not isinstance(results, (tuple, list)) else results
        if len(results) != len(self.outputs):
            raise BackendError(f"{self.component}: the package returned {len(results)} outputs, the bundle contract "
                               f"has {len(self.outputs)}")
        for result, buffer in zip(results, self.outputs):
            if result.shape != buffer.shape or result.dtype != buffer.dtype:
                raise BackendError(f"{self.component}: the package returned {result.dtype} {list(result.shape)}, "
                                   f"the buffer is {buffer.dtype} {list(buffer.shape)}")
            buffer.copy_(result)
