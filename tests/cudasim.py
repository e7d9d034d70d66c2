"""A CPU stand-in for one CUDA GPU, so that the product's CUDA branches run to the end on a machine without one.

`simulated_gpu()` makes torch believe that one GPU is there and records each host-side CUDA call, after torch's own
argument checks:
- torch's own Python functions run (is_available, device_count, current_device, get_device_properties/name,
  set_per_process_memory_fraction, get/set_rng_state, manual_seed(_all), synchronize, set_sync_debug_mode, the memory
  stats, empty_cache): only the C bindings they end in, which need a driver, are replaced, by recorders that check
  the device index as CUDA would. `torch.cuda._initialized` is set, as after a real initialisation, so torch's lazy
  calls (set_rng_state, manual_seed_all) run at once instead of waiting in its queue.
- The GPU's default generator, streams and events cannot be made without a driver: stand-ins check what CUDA checks
  (the generator's state a 16-byte ByteTensor, a stream to record an event on, on the event's device).
- A TorchFunctionMode makes the tensors asked for on cuda on the CPU (a `device` argument of any torch function,
  `Tensor.to`, `Tensor.cuda`, so `Module.to` too) and drops `pin_memory` (pinning needs a driver); a CPU tensor stays
  a CPU tensor. `torch.autocast("cuda", ...)` is checked by torch's own autocast, then runs as a CPU autocast of the
  same dtype: a CUDA autocast over CPU tensors would change nothing, and the bf16 numerics that the product has on a
  GPU (the reason evaluation must leave autocast) would silently be missing here.

What it cannot show: a CPU-made tensor meeting a CUDA one (all are CPU here: tests/test_device.py runs the tensor code
on `meta` for that), branches keyed on a tensor's own device (`x.is_cuda` is False here), host syncs, CUDA kernels
and their numerics, real memory limits. tests/test_gpu.py on a real GPU shows those.
"""

from __future__ import annotations

import contextlib
import struct
import types
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch.cuda._utils import _get_device_index
from torch.overrides import TorchFunctionMode

DEVICE_NAME = "cudasim (a CPU standing in for one CUDA GPU)"
_AUTOCAST = torch.amp.autocast_mode.autocast  # torch's own, before the harness replaces torch.autocast
_CUDA = 1  # c10::DeviceType::CUDA, the third value of torch._C._cuda_getCurrentStream


@dataclass
class SimulatedGPU:
    """What the product asked of the simulated GPU: `calls` holds (name, args) of each host-side CUDA call after its
    checks passed; `moved` counts, per torch function, the cuda tensors made on the CPU instead."""

    device_count: int = 1
    current: int = 0
    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    moved: Counter[str] = field(default_factory=Counter)

    def record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))

    def called(self, name: str) -> list[tuple[Any, ...]]:
        """The arguments of each recorded `name` call, in order."""
        return [args for n, args in self.calls if n == name]

    def check_index(self, index: int) -> int:
        """A device index CUDA accepts (what the driver answers for another one)."""
        if not 0 <= index < self.device_count:
            raise RuntimeError(f"CUDA error: invalid device ordinal (device {index}, {self.device_count} visible)")
        return index


class SimGenerator:
    """The GPU's default generator (`torch.cuda.default_generators[i]`) with CUDA's state: 16 bytes, the seed and the
    Philox offset. `set_state` refuses what CUDAGeneratorImpl::set_state refuses (not a CPU ByteTensor, not its size:
    a CPU generator's 5056-byte state too), `manual_seed` what torch's generator binding refuses."""

    def __init__(self, sim: SimulatedGPU, index: int) -> None:
        self.sim, self.index = sim, index
        self.seed, self.offset = torch.Generator().initial_seed(), 0  # torch's default seed, nothing drawn yet

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.index)

    def get_state(self) -> torch.Tensor:
        self.sim.record("cuda_generator.get_state", self.index)
        return torch.tensor(list(struct.pack("<QQ", self.seed, self.offset)), dtype=torch.uint8)  # (16,)

    def set_state(self, state: Any) -> None:
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"expected a torch.ByteTensor, but got {type(state).__name__}")
        if state.layout != torch.strided or state.device.type != "cpu" or state.dtype != torch.uint8:
            raise TypeError("RNG state must be a torch.ByteTensor")
        if state.numel() not in (16, 8):  # seed + offset, or the older seed-only form
            raise RuntimeError("RNG state is wrong size")
        raw = bytes(state.tolist()) + bytes(16 - state.numel())
        self.seed, self.offset = struct.unpack("<QQ", raw)
        self.sim.record("cuda_generator.set_state", self.index, state.clone())

    def manual_seed(self, seed: int) -> SimGenerator:
        self.seed, self.offset = torch.Generator().manual_seed(seed).initial_seed(), 0  # the binding's range check
        self.sim.record("cuda_generator.manual_seed", self.index, seed)
        return self

    def initial_seed(self) -> int:
        return self.seed


class SimStream:
    """A CUDA stream as `torch.cuda.current_stream` builds one from what `_cuda_getCurrentStream` answered."""

    def __init__(self, device: Any = None, priority: int = 0, stream_id: int = 0, device_index: int = 0,
                 device_type: int = _CUDA) -> None:  # fmt: skip
        self.stream_id, self.device_index = stream_id, device_index

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.device_index)

    def is_capturing(self) -> bool:  # asked by torch's optimisers before each step (CUDA graph capture)
        return False


def _event_class(sim: SimulatedGPU) -> type:
    class SimEvent:
        """A CUDA event: recorded on a stream of its device (CUDA's own checks), then waited for."""

        def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
            self.device_index: int | None = None
            sim.record("Event")

        def record(self, stream: Any = None) -> None:
            if stream is None:
                stream = torch.cuda.current_stream()
            if not isinstance(stream, SimStream):  # the binding's argument parser: a torch.cuda.Stream or nothing
                raise TypeError(f"record(): argument 'stream' must be torch.cuda.Stream, not {type(stream).__name__}")
            if self.device_index is not None and self.device_index != stream.device_index:
                raise RuntimeError(f"Event device {self.device_index} does not match recording stream's device "
                                   f"{stream.device_index}.")  # fmt: skip
            self.device_index = stream.device_index
            sim.record("Event.record", stream.device_index)

        def synchronize(self) -> None:
            sim.record("Event.synchronize", self.device_index)

        def query(self) -> bool:
            return True

    return SimEvent


class _CudaTensorsOnCpu(TorchFunctionMode):
    """Tensors asked for on cuda are made on the CPU; an index CUDA would refuse still fails."""

    def __init__(self, sim: SimulatedGPU) -> None:
        super().__init__()
        self.sim = sim

    def _host(self, device: Any, name: str) -> Any:
        if isinstance(device, bool) or not isinstance(device, int | str | torch.device):
            return device
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if dev.type != "cuda":
            return device  # a CPU (or meta) tensor stays where the product made it
        self.sim.check_index(self.sim.current if dev.index is None else dev.index)
        self.sim.moved[name] += 1
        return torch.device("cpu")

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", str(func))
        if func is torch.Tensor.cuda:  # tensor.cuda(device=None, non_blocking=False): the index torch would use
            tensor, *rest = args
            index = _get_device_index(rest[0] if rest else kwargs.pop("device", None), optional=True)
            func, args = torch.Tensor.to, (tensor, torch.device("cuda", index))
        if func is torch.Tensor.pin_memory:  # a page-locked copy: here an ordinary one
            self.sim.record("pin_memory")
            return args[0].clone()
        if kwargs.get("pin_memory"):
            self.sim.record("pin_memory")
            kwargs["pin_memory"] = False
        if "device" in kwargs:
            kwargs["device"] = self._host(kwargs["device"], name)
        if func is torch.Tensor.to and len(args) > 1:  # to(device, ...), to(dtype), to(other)
            args = (args[0], self._host(args[1], name), *args[2:])
        return func(*args, **kwargs)


def _autocast(sim: SimulatedGPU) -> Any:
    def autocast(device_type: str, dtype: torch.dtype | None = None, enabled: bool = True,
                 cache_enabled: bool | None = None) -> Any:  # fmt: skip
        if device_type != "cuda":
            return _AUTOCAST(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)
        # torch's own checks of a CUDA autocast (dtype, bf16 support): it refuses, or warns and disables, as on a GPU
        cuda = _AUTOCAST("cuda", dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)
        sim.record("autocast", cuda.fast_dtype, cuda._enabled)
        return _AUTOCAST("cpu", dtype=cuda.fast_dtype, enabled=cuda._enabled, cache_enabled=cache_enabled)

    return autocast


@contextlib.contextmanager
def simulated_gpu(device_count: int = 1) -> Iterator[SimulatedGPU]:
    """One simulated CUDA GPU (or `device_count`) for the duration of the block; everything is undone after."""
    sim = SimulatedGPU(device_count=device_count)

    def exchange_device(index: int) -> int:  # torch.cuda.device(...) entering and leaving
        previous = sim.current
        if index >= 0:
            sim.current = sim.check_index(index)
        return previous

    def current_stream(index: int) -> tuple[int, int, int]:
        sim.record("current_stream", sim.check_index(index))
        return 0, index, _CUDA

    def accelerator_stream(index: int) -> SimStream:  # torch.accelerator.current_stream, which torch's optimisers ask
        return SimStream(device_index=sim.check_index(index))

    def memory_fraction(fraction: float, index: int) -> None:
        sim.record("set_per_process_memory_fraction", fraction, sim.check_index(index))

    def memory_stats(index: int) -> dict[str, Any]:
        sim.record("memory_stats", sim.check_index(index))
        peak = {"all": {"current": 0, "peak": 2**20, "allocated": 2**20, "freed": 2**20}}
        return {"allocated_bytes": peak, "reserved_bytes": peak}

    properties = types.SimpleNamespace(name=DEVICE_NAME, major=9, minor=0, total_memory=80 * 2**30,
                                       multi_processor_count=132)  # fmt: skip
    bindings = {
        "_cuda_getDeviceCount": lambda: sim.device_count,
        "_cuda_getDevice": lambda: sim.current,
        "_cuda_getCurrentStream": current_stream,
        "_cuda_setMemoryFraction": memory_fraction,
        "_cuda_set_sync_debug_mode": lambda mode: sim.record("set_sync_debug_mode", mode),
        "_cuda_memoryStats": memory_stats,
        "_cuda_resetPeakMemoryStats": lambda index: sim.record("reset_peak_memory_stats", sim.check_index(index)),
        "_cuda_emptyCache": lambda: sim.record("empty_cache"),
        "_cuda_synchronize": lambda: sim.record("synchronize", sim.current),
        "_accelerator_getDeviceIndex": lambda: sim.current,
        "_accelerator_getStream": accelerator_stream,
    }
    with pytest.MonkeyPatch.context() as mp:
        for name, fn in bindings.items():
            mp.setattr(torch._C, name, fn, raising=False)  # raising=False: a CPU-only torch has no CUDA bindings
        mp.setattr(torch.cuda, "_initialized", True)
        mp.setattr(torch.cuda, "_cached_device_count", None)  # device_count caches once initialised: undone after
        mp.setattr(torch.cuda, "_exchange_device", exchange_device)
        mp.setattr(torch.cuda, "_maybe_exchange_device", exchange_device)
        mp.setattr(torch.cuda, "_get_device_properties", lambda index: properties, raising=False)
        mp.setattr(torch.cuda, "default_generators", tuple(SimGenerator(sim, i) for i in range(device_count)))
        mp.setattr(torch.cuda, "Stream", SimStream)
        mp.setattr(torch.cuda, "Event", _event_class(sim))
        mp.setattr(torch, "autocast", _autocast(sim))
        mp.setattr(torch.amp, "autocast", _autocast(sim))
        with _CudaTensorsOnCpu(sim):
            yield sim
