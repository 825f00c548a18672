"""The accelerator fast path of the one training loop: mixed precision, channels-last convolutions,
compiled experts, device-side finiteness checks and data that streams when it does not fit.

Each is a ``train`` config key and off (or automatic) by default, so CPU runs stay bit-identical:
- ``train.amp: off|bf16|fp16``: autocast for forward and loss; fp16 adds a gradient scaler, whose
  unscale runs before the strategies' after_backward hooks (EWC/SI add penalty gradients there and
  must see true gradients).
- ``train.channels_last``: conv experts' weights in NHWC; convolutions then pick NHWC kernels
  (tensor cores on recent GPUs). Inputs are left alone: a conv with NHWC weights returns NHWC.
  Applied on CUDA only: on the CPU it buys nothing, and torch 2.13's CPU kernels corrupted the heap
  (glibc abort) training a channels-last ResNet-18 at batch 3 (benchmarks/gpu_check.py --small found it).
- ``train.compile: off|default|reduce-overhead|max-autotune``: ``nn.Module.compile`` on each
  trainable expert's network (in place, so state_dict keys and saved experts do not change);
  reduce-overhead captures CUDA graphs, the fix for launch-bound small-batch steps.
- ``train.check_finite_every``: a NaN/inf loss is caught on the device and read back every N steps
  (default: every step on CPU, where reading is free; every 50 on an accelerator, where each read
  stalls the launch queue).
- ``train.data_placement: auto|device|host``: a task's tensors move to the device once when they fit
  (auto: under a quarter of free device memory), else they stay in pinned host memory and each
  minibatch is copied asynchronously.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str):
    if amp == "off":
        return nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def grad_scaler(device: torch.device, amp: str):
    """fp16 needs loss scaling (its range underflows small gradients); bf16 does not."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


def has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in module.modules())


def prepare_experts(experts, channels_last: bool, compile_mode: str, backend: str = "inductor") -> None:
    """Apply the model-side fast path to the experts that train in this task (idempotent)."""
    for expert in experts:
        if channels_last and has_conv(expert) and next(expert.parameters()).is_cuda:
            expert.to(memory_format=torch.channels_last)
        if compile_mode != "off" and not getattr(expert.net, "_modulemesh_compiled", False):
            mode = None if compile_mode == "default" or backend != "inductor" else compile_mode
            expert.net.compile(mode=mode, backend=backend)
            expert.net._modulemesh_compiled = True


def check_every(device: torch.device, configured: int | None) -> int:
    if configured is not None:
        return configured
    return 1 if device.type == "cpu" else 50


def keep_on_device(device: torch.device, tensors, setting: str) -> bool:
    if device.type == "cpu" or setting == "device":
        return True
    if setting == "host":
        return False
    need = sum(t.numel() * t.element_size() for t in tensors)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need < free // 4
    return True


def pin(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory() if torch.cuda.is_available() else t
