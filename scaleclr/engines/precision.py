"""Mixed precision helpers shared by the engines: autocast settings and fp32 BatchNorm."""
import contextlib

import torch
from torch import nn

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _to_fp32(module, args):
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def keep_batchnorm_fp32(model: nn.Module) -> int:
    """Make every BatchNorm (incl. SyncBN) compute in fp32 under autocast: its input is cast to fp32, its
    parameters and running statistics stay fp32. Returns the number of BN modules hooked."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.float()
            m.register_forward_pre_hook(_to_fp32)
            n += 1
    return n


def autocast(device: torch.device, enabled: bool, dtype: torch.dtype):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
