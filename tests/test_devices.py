"""dpq.devices: precision decided on the machine that runs, autocast contexts."""

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


def test_autocast_contexts():
    x = torch.randn(4, 4)
    with devices.autocast("cpu", "bf16"):
        assert (x @ x).dtype == torch.bfloat16
        with devices.full_precision("cpu"):
            assert (x @ x).dtype == torch.float32
    with devices.autocast("cpu", "fp32"):
        assert (x @ x).dtype == torch.float32
