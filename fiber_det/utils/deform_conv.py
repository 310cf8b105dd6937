"""Keeps NaN offsets out of torchvision's deformable convolution, which crashes on them.

torchvision's ``deform_conv2d`` kernels sample with a bilinear interpolation that returns 0 for a
position outside the map, tested as ``h <= -1 || height <= h || w <= -1 || width <= w``. A NaN
position fails every comparison, passes the test, and ``(int) floor(NaN)`` is then an arbitrary
index (INT_MIN on x86): the kernel reads far outside the input and the process dies with a
segmentation fault (an illegal memory access on CUDA) before any NaN check can see the loss.
±inf positions compare correctly and sample 0. A diverging run (e.g. a huge learning rate) makes
the offsets NaN, so they are replaced before the kernel, and the NaN is put back into its output.
"""
from typing import Tuple

import torch

__all__ = ["nan_safe_offsets"]


def nan_safe_offsets(offset: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(offsets with NaN replaced by +inf (positions outside the map, sampled as 0), a 0-d tensor
    that is NaN if any offset was NaN and 0 otherwise, to add to the convolution's output).

    No host synchronisation: finite offsets pass unchanged and the added 0 changes no value, so
    the result equals the unguarded kernel's whenever that does not crash.

    Args:
        offset: (B, 2 * kh * kw * offset_groups, H_out, W_out) sampling offsets.
    """
    isnan = torch.isnan(offset)
    poison = torch.where(isnan.any(), float("nan"), 0.0).to(offset.dtype)
    return torch.where(isnan, float("inf"), offset), poison
