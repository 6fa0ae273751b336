"""Compute device selection: CUDA, then Apple MPS, then CPU, unless the user asks otherwise."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch

from .errors import DeviceError


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
    """Temporarily run torch's CPU ops on ``n`` threads.

    The optimisation loop is hundreds of small tensor ops per iteration: their OpenMP
    fork/join costs more than the work, and when cores are shared with other processes a
    descheduled worker thread stalls every op (measured: 10x slower with 2 threads than 1 on
    a busy 2-core machine). One thread is the robust choice on CPU.
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
