"""Compute device selection: CUDA, then Apple MPS, then CPU, unless the user asks otherwise."""
from __future__ import annotations

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


def inference_dtype(device: torch.device) -> "torch.dtype | None":
    """Autocast dtype for inference on ``device``: fp16 on CUDA, None (fp32) elsewhere.

    bf16 on CPU is opt-in (see Embedder): it is only faster on CPUs with native bf16/AMX.
    """
    return torch.float16 if device.type == "cuda" else None
