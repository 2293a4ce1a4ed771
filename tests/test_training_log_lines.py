"""dpq.training.log_lines: the lines the loop logs, from the values they report."""

import torch

from dpq.devices import describe_device
from dpq.training.ddp import DistributedContext
from dpq.training.log_lines import backbone_weights_line, epoch_line, running_losses, setup_lines

SHOWN = (("total", "loss"), ("cls", "L_C"), ("E", "E"))


def test_setup_lines_say_only_what_differs_from_one_cpu_process_in_fp32():
    cpu = torch.device("cpu")
    assert setup_lines(64, cpu, "fp32", False) == []
    lines = setup_lines(64, cpu, "bf16", False, DistributedContext(0, 4), streamed=(5000, 3))
    assert lines == [
        "DistributedDataParallel: 4 processes (gloo), global batch 64 = 16 per process",
        f"training on {describe_device(cpu)} in bf16 autocast",
        "reading 5,000 training images on demand with 3 worker process(es)",
    ]
    assert setup_lines(64, cpu, "fp16", True)[0].endswith("in fp16 autocast with a gradient scaler")


def test_loss_and_epoch_lines():
    sums = {"total": 3.0, "cls": 1.5, "semantic": 9.0}
    assert running_losses(sums, 3, SHOWN) == "loss 1, L_C 0.5"
    record = {"epoch": 2, "phase": "features", "total": 0.25, "E": 0.125, "seconds": 1.26}
    assert epoch_line(record, 5, SHOWN) == "epoch 2/5 (features): loss 0.25, E 0.125; 1.3 s"
    record["train_accuracy"] = 0.5
    assert ", train accuracy 0.500; " in epoch_line(record, 5, SHOWN)
    assert backbone_weights_line("w.safetensors", {"loaded": 20, "ignored": 0}) == (
        "backbone weights from w.safetensors: 20 tensors"
    )
    assert backbone_weights_line("w.pt", {"loaded": 20, "ignored": 2}).endswith(
        "20 tensors (2 classifier tensors left out)"
    )
