"""Compute device selection: CUDA, then Apple MPS, then CPU, unless the user asks otherwise."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import DeviceError, InputError


def select_device(requested: "str | torch.device" = "auto") -> torch.device:
    """Return the torch.device to run on. 'auto' picks CUDA > MPS > CPU.

    An explicitly requested device that is not present raises DeviceError (never a silent
    fallback: a user who asked for the GPU must learn it is missing).
    """
    req = str(requested).strip().lower()
    if req in ("auto", ""):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if req.startswith("cuda") or req == "gpu":
        if not torch.cuda.is_available():
            raise DeviceError(f"device '{requested}' requested but no CUDA GPU is available (torch {torch.__version__})")
        dev = torch.device("cuda" if req == "gpu" else req)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device '{requested}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return dev
    if req == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise DeviceError("device 'mps' requested but Apple MPS is not available")
        return torch.device("mps")
    if req == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"unknown device '{requested}': use auto, cpu, cuda, cuda:N or mps")


@contextmanager
def torch_threads(n: Optional[int], device: torch.device):
    """Temporarily run torch's CPU ops on ``n`` threads (the one thread pinner of the intensity
    refinements: click, linear, deformable).

    The optimisation loop is hundreds of small tensor ops per iteration: their OpenMP
    fork/join costs more than the work, and when cores are shared with other processes a
    descheduled worker thread stalls every op (measured: 10x slower with 2 threads than 1 on
    a busy 2-core machine). One thread is the robust choice on CPU.

    Args:
        n: threads (at least 1); None leaves torch's setting.
        device: the device the work runs on; anything but the CPU leaves torch's setting.
    """
    if device.type != "cpu" or n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class DevicePlan:
    """How inference runs on one device: decided once from the device's type (never from the
    platform), so the CUDA-only choices are testable on a CPU machine.

    Attributes:
        device: where the network, the search index and the matching run.
        autocast_dtype: reduced precision for the network (None: float32). Peaks are always
            picked in float32 (search.py).
        channels_last: 3D channels-last memory format (fast oneDNN / cuDNN kernels).
        pin_memory: page-locked host buffers, so host-to-device copies are asynchronous.
        cudnn_benchmark: let cuDNN time its algorithms once per shape (slabs repeat shapes).
        memory_budget_bytes: what one slab of the network may use at its widest stage.
    """

    device: torch.device
    autocast_dtype: Optional[torch.dtype]
    channels_last: bool
    pin_memory: bool
    cudnn_benchmark: bool
    memory_budget_bytes: int


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def plan_for(device: torch.device, precision: str = "auto", free_bytes: Optional[int] = None,
             cpu_budget_gb: float = 1.5) -> DevicePlan:
    """The DevicePlan for ``device``.

    Args:
        device: the selected device (see :func:`select_device`).
        precision: 'auto', 'fp32', 'bf16' or 'fp16'. 'auto' is fp16 on CUDA, bf16 on CPUs with
            native bf16 (AVX512-BF16 / AMX), else fp32.
        free_bytes: free device memory; on CUDA the slab budget is half of it (the other half
            covers cuDNN workspaces and the caller's tensors). None on CUDA asks the driver.
        cpu_budget_gb: the slab budget off CUDA (host memory is shared with everything else).

    Returns:
        the plan. Raises DeviceError for an unknown precision.
    """
    kind = device.type
    if precision == "auto":
        if kind == "cuda":
            dtype = torch.float16
        elif kind == "cpu" and torch.backends.mkldnn.is_available() and _cpu_has_fast_bf16():
            dtype = torch.bfloat16
        else:
            dtype = None
    elif precision in PRECISIONS:
        dtype = PRECISIONS[precision]
    else:
        raise InputError(f"unknown precision {precision!r}: use auto, fp32, bf16 or fp16")
    if kind == "cuda":
        if free_bytes is None:
            free_bytes, _total = torch.cuda.mem_get_info(device)
        budget = int(free_bytes) // 2
    else:
        budget = int(cpu_budget_gb * 1e9)
    return DevicePlan(device=device, autocast_dtype=dtype, channels_last=kind in ("cpu", "cuda"),
                      pin_memory=kind == "cuda", cudnn_benchmark=kind == "cuda", memory_budget_bytes=budget)


def _cpu_has_fast_bf16() -> bool:
    # bf16 convolutions only beat fp32 on CPUs with native bf16 (AVX512-BF16 / AMX).
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover - older torch
        return False


def to_device(array, plan: DevicePlan) -> torch.Tensor:
    """A host numpy array as a tensor on the plan's device (pinned, asynchronous copy on CUDA)."""
    t = torch.from_numpy(array)
    if plan.pin_memory:
        return t.pin_memory().to(plan.device, non_blocking=True)
    return t.to(plan.device)
