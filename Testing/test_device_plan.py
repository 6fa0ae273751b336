"""The CUDA-only branches of inference are chosen by the device, never by the platform: a
plan for a CUDA device is built (and checked) on this CPU-only machine."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from samv2core.device import plan_for, to_device
from samv2core.errors import InputError


def test_cuda_plan_is_chosen_by_the_device():
    plan = plan_for(torch.device("cuda", 0), "auto", free_bytes=40 * 2**30)
    assert plan.pin_memory and plan.cudnn_benchmark and plan.channels_last
    assert plan.autocast_dtype == torch.float16
    # the slab budget follows the free device memory, not the host's 1.5 GB default
    assert plan.memory_budget_bytes == 20 * 2**30
    small = plan_for(torch.device("cuda", 0), "auto", free_bytes=4 * 2**30)
    assert small.memory_budget_bytes == 2 * 2**30


@pytest.mark.parametrize("platform", ["linux", "win32", "darwin"])
def test_cpu_plan_is_the_same_on_every_platform(monkeypatch, platform):
    monkeypatch.setattr(sys, "platform", platform)
    plan = plan_for(torch.device("cpu"), "fp32", cpu_budget_gb=1.5)
    assert not plan.pin_memory and not plan.cudnn_benchmark
    assert plan.autocast_dtype is None
    assert plan.memory_budget_bytes == int(1.5e9)


def test_explicit_precisions_and_a_bad_one():
    cpu = torch.device("cpu")
    assert plan_for(cpu, "bf16").autocast_dtype == torch.bfloat16
    assert plan_for(torch.device("cuda"), "fp32", free_bytes=1).autocast_dtype is None
    with pytest.raises(InputError, match="unknown precision 'fp8'"):
        plan_for(cpu, "fp8")


def test_host_copy_on_cpu_is_a_plain_view():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = to_device(a, plan_for(torch.device("cpu"), "fp32"))
    assert t.device.type == "cpu" and np.array_equal(t.numpy(), a)
