"""DyHead tower: scale-, spatial- and task-aware attention over the P3-P7 pyramid.

Modulated deformable convolution runs through ``torchvision.ops.deform_conv2d`` (CPU and CUDA,
DCNv2 math, the kernel Detectron2 also ships) and always in fp32, as upstream.
Feature maps are NCHW; the pyramid is a list of 5 levels, finest first.
"""
from typing import List

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import DeformConv2d

from ...utils.deform_conv import nan_safe_offsets

__all__ = ["DyHeadTower", "DyConv", "DyReLU", "HSigmoid"]


class HSigmoid(nn.Module):
    """ReLU6(x + 3) / 6 (upstream writes it as ``relu6(x + 3) * h_max / 6`` with h_max = 1)."""

    def forward(self, x):
        return F.relu6(x + 3.0) * 1.0 / 6.0


class ModulatedDeformConv3x3(DeformConv2d):
    """3x3 modulated deformable conv computed in fp32 (upstream ``custom_fwd(cast_inputs=fp32)``).

    Keeps ``weight`` (out, in, 3, 3) and ``bias`` names; init as upstream: uniform(±1/sqrt(in·9))
    (torchvision's kaiming_uniform(a=√5) is that bound) and zero bias.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__(in_channels, out_channels, 3, stride=stride, padding=1, bias=True)
        nn.init.zeros_(self.bias)

    def forward(self, x, offset, mask):
        """x (B, C_in, H, W), offset (B, 18, H_o, W_o) as (dy, dx) per tap, mask (B, 9, H_o, W_o)."""
        with torch.autocast(x.device.type, enabled=False):
            offset, nan = nan_safe_offsets(offset.float())  # NaN offsets crash torchvision's kernel
            return super().forward(x.float(), offset, mask.float()) + nan


class Conv3x3Norm(nn.Module):
    """``conv`` (modulated deformable 3x3, or a plain 3x3 conv without ``deformable``) followed by
    ``bn`` = GroupNorm (upstream names)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, gn_groups: int, deformable: bool = True):
        super().__init__()
        if deformable:
            self.conv = ModulatedDeformConv3x3(in_channels, out_channels, stride)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
            nn.init.zeros_(self.conv.bias)
        self.deformable = deformable
        self.bn = nn.GroupNorm(gn_groups, out_channels)

    def forward(self, x, offset=None, mask=None):
        return self.bn(self.conv(x, offset, mask) if self.deformable else self.conv(x))


class DyReLU(nn.Module):
    """Dynamic ReLU (K=2 with bias, no spatial branch): max(x·a1 + b1, x·a2 + b2) with
    per-image, per-channel coefficients from the globally pooled input (upstream's
    configuration: reduction 4, K2 with bias, no spatial attention)."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.channels = channels
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels * 4),
            HSigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        b, c = x.shape[:2]
        y = self.fc(x.mean(dim=(2, 3))).view(b, 4 * c, 1, 1)
        a1, b1, a2, b2 = torch.split(y, c, dim=1)
        a1 = (a1 - 0.5) * 2.0 + 1.0  # lambda_a = 2, init_a = (1, 0), init_b = (0, 0)
        a2 = (a2 - 0.5) * 2.0 + 0.0
        b1 = b1 - 0.5 + 0.0
        b2 = b2 - 0.5 + 0.0
        return torch.max(x * a1 + b1, x * a2 + b2)


def reinterpret_for_coarser(offset: torch.Tensor, mask: torch.Tensor, h: int, w: int):
    """Upstream quirk of the coarser-level term, reproduced because released weights depend on it.

    The coarser-level term convolves the (h, w) map of level l+1 with level l's offsets. The
    official CUDA op does no shape check and reads the first 18·h·w (9·h·w) values of each
    image's channel-major (18, H, W) offset (mask) buffer as if it were (18, h, w). torchvision
    checks shapes, so we build those views explicitly.
    """
    b = offset.shape[0]
    off = offset.reshape(b, -1)[:, : 18 * h * w].reshape(b, 18, h, w)
    msk = mask.reshape(b, -1)[:, : 9 * h * w].reshape(b, 9, h, w)
    return off, msk


class DyConv(nn.Module):
    """One DyHead block over the whole pyramid (weights shared across levels).

    ``DyConv.0`` / ``.1`` / ``.2`` convolve the coarser (then bilinearly upsampled, align_corners)
    / same / finer (stride 2) level with the same level-l offsets; ``AttnConv`` gives one
    scale-attention scalar per term and image; the weighted mean goes through DyReLU.
    With ``deformable=False`` (upstream DYHEAD.USE_DFCONV False) the three convs are plain 3x3
    convs and there is no ``offset`` branch: several times cheaper on CPU, not the released model.
    """

    def __init__(self, channels: int, gn_groups: int, deformable: bool = True):
        super().__init__()
        self.DyConv = nn.ModuleList([
            Conv3x3Norm(channels, channels, 1, gn_groups, deformable),
            Conv3x3Norm(channels, channels, 1, gn_groups, deformable),
            Conv3x3Norm(channels, channels, 2, gn_groups, deformable),
        ])
        self.AttnConv = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, 1, 1), nn.ReLU(inplace=True))
        self.h_sigmoid = HSigmoid()
        self.relu = DyReLU(channels)
        self.deformable = deformable
        if deformable:
            self.offset = nn.Conv2d(channels, 27, kernel_size=3, stride=1, padding=1)  # PyTorch default init
        nn.init.normal_(self.AttnConv[1].weight, 0, 0.01)
        nn.init.zeros_(self.AttnConv[1].bias)

    def forward(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        """List of L maps (B, C, H_l, W_l) -> list of L maps of the same shapes."""
        out = []
        last = len(features) - 1
        for level, x in enumerate(features):
            offset = mask = None
            if self.deformable:
                om = self.offset(x)
                offset, mask = om[:, :18], om[:, 18:].sigmoid()
            terms = [self.DyConv[1](x, offset, mask)]
            if level > 0:
                terms.append(self.DyConv[2](features[level - 1], offset, mask))
            if level < last:
                nxt = features[level + 1]
                off = msk = None
                if self.deformable:
                    off, msk = reinterpret_for_coarser(offset, mask, *nxt.shape[-2:])
                coarse = self.DyConv[0](nxt, off, msk)
                terms.append(F.interpolate(coarse, size=x.shape[-2:], mode="bilinear", align_corners=True))
            stacked = torch.stack(terms)
            attn = self.h_sigmoid(torch.stack([self.AttnConv(t) for t in terms]))
            out.append(self.relu(torch.mean(stacked * attn, dim=0)))
        return out


class DyHeadTower(nn.Sequential):
    """``num_convs`` DyConv blocks applied in sequence to the pyramid."""

    def __init__(self, channels: int, num_convs: int, gn_groups: int, deformable: bool = True):
        super().__init__(*[DyConv(channels, gn_groups, deformable) for _ in range(num_convs)])
