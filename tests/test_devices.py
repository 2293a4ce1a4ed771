"""dpq.devices: precision decided on the machine that runs, autocast contexts."""

import os
import subprocess
import sys

import pytest
import torch

from dpq import devices


def test_auto_precision_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(devices, "native_bf16", lambda: True)
    assert devices.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(devices, "native_bf16", lambda: False)
    assert devices.resolve_precision("auto", "cpu") == "fp32"
    assert devices.resolve_precision("fp16", "cpu") == "fp16"
    with pytest.raises(ValueError, match="precision must be"):
        devices.resolve_precision("int8")


@pytest.mark.parametrize("limit", [{"ONEDNN_MAX_CPU_ISA": "AVX2"}, {"ATEN_CPU_CAPABILITY": "avx2"}])
def test_an_instruction_set_limit_to_avx2_means_no_native_bf16(limit):
    """A process limited to AVX2 kernels computes as an AVX2-only CPU does: auto is fp32."""
    code = (
        "from dpq import devices; print(devices.native_bf16(), devices.resolve_precision('auto'))"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, **limit},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert out.stdout.split() == ["False", "fp32"]


def test_autocast_contexts():
    x = torch.randn(4, 4)
    with devices.autocast("cpu", "bf16"):
        assert (x @ x).dtype == torch.bfloat16
        with devices.full_precision("cpu"):
            assert (x @ x).dtype == torch.float32
    with devices.autocast("cpu", "fp32"):
        assert (x @ x).dtype == torch.float32


def test_device_names_resolve_on_this_machine():
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_device(" CPU ") == torch.device("cpu")
    assert devices.resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert devices.resolve_device("auto").type == expected
    assert devices.resolve_device(None).type == expected
    for bad in ("gpu", "cuda:x", "cpu:1", "tpu", ""):
        with pytest.raises(ValueError, match="--device must be auto, cpu, cuda, cuda:N or mps"):
            devices.resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_one_clear_sentence():
    for name in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(ValueError, match=rf"--device {name}: .* use --device cpu") as info:
            devices.resolve_device(name)
        assert "\n" not in str(info.value)


def test_cuda_device_numbers_are_checked_against_the_count(monkeypatch):
    # the machine's answers replaced: a two-GPU machine, to check the numbering rule here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert devices.resolve_device("cuda") == torch.device("cuda", 0)
    assert devices.resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ValueError, match="has 2 CUDA device"):
        devices.resolve_device("cuda:2")


def test_mps_where_there_is_none(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no usable Apple GPU"):
        devices.resolve_device("mps")


def test_the_gradient_scaler_scales_fp16_only():
    assert devices.gradient_scaler("cpu", "fp16").is_enabled()
    assert not devices.gradient_scaler("cpu", "bf16").is_enabled()
    assert not devices.gradient_scaler("cpu", "fp32").is_enabled()
    assert devices.pin_memory("cuda") and not devices.pin_memory("cpu")
    assert 1 <= devices.default_workers() <= 8
    assert devices.describe_device("cpu").startswith("cpu (")
