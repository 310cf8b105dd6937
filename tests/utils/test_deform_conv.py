"""NaN offsets: torchvision's deformable conv crashes the process; nan_safe_offsets keeps it alive
and the NaN visible, and changes nothing for finite offsets."""
import subprocess
import sys

import torch
from torchvision.ops import deform_conv2d

from fiber_det.utils.deform_conv import nan_safe_offsets

CRASH = """
import torch
from torchvision.ops import deform_conv2d
offset = torch.zeros(1, 18, 16, 16)
offset[0, :, 5, 5] = float("nan")
deform_conv2d(torch.randn(1, 4, 16, 16), offset, torch.randn(4, 4, 3, 3), padding=1, mask=torch.ones(1, 9, 16, 16))
print("survived")
"""


def _inputs():
    torch.manual_seed(0)
    return torch.randn(1, 4, 16, 16), torch.randn(1, 18, 16, 16) * 3, torch.randn(4, 4, 3, 3), torch.rand(1, 9, 16, 16)


def test_the_unguarded_kernel_dies_on_a_nan_offset():
    proc = subprocess.run([sys.executable, "-c", CRASH], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "survived" not in proc.stdout  # SIGSEGV (-11) on x86


def test_guarded_offsets_give_nan_without_a_crash_and_change_nothing_else():
    x, offset, weight, mask = _inputs()
    safe, nan = nan_safe_offsets(offset)
    assert torch.equal(deform_conv2d(x, safe, weight, padding=1, mask=mask) + nan,
                       deform_conv2d(x, offset, weight, padding=1, mask=mask))
    offset[0, 3, 4, 4] = float("nan")
    offset[0, 5, 6, 6] = float("inf")
    offset.requires_grad_(True)
    safe, nan = nan_safe_offsets(offset)
    out = deform_conv2d(x, safe, weight, padding=1, mask=mask) + nan
    assert torch.isnan(out).all()
    out.sum().backward()  # the backward kernel survives too
    assert offset.grad is not None
