"""FLOP counting: ``torch.utils.flop_counter.FlopCounterMode`` plus deformable convolutions.

FlopCounterMode counts matmuls, convolutions and attention kernels (2 FLOPs per multiply-add,
elementwise ops, normalisations and softmax not counted) but has no formula for torchvision's
``deform_conv2d``, which every DyHead conv calls. Those calls are counted analytically from
forward hooks on :class:`torchvision.ops.DeformConv2d` modules, per call:

    contraction = 2 · N · H_out · W_out · C_out · (C_in / groups) · k_h · k_w
    sampling    = N · H_out · W_out · C_in · k_h · k_w · (7 + 1 if modulated else 7)
    forward     = contraction + sampling

"sampling" is the bilinear interpolation of every (position, tap, channel) sample from its 4
neighbours (4 products + 3 sums) and, for modulated (DCNv2) convs, the product with the mask;
the index and corner-weight arithmetic is not counted, as FlopCounterMode counts no index
arithmetic either. A backward pass costs 2 × forward (gradients of the input / offsets / mask
and of the weight), the convention FlopCounterMode applies to ordinary convolutions.
Deformable calls made through the functional ``torchvision.ops.deform_conv2d`` outside a
``DeformConv2d`` module are not seen (fiber_det makes none).
"""
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Tuple

from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import DeformConv2d

__all__ = [
    "BILINEAR_FLOPS",
    "MODULATION_FLOPS",
    "DEFORM_BACKWARD_FACTOR",
    "deform_conv2d_flops",
    "DeformConvFlops",
    "FlopCount",
    "count_flops",
]

BILINEAR_FLOPS = 7  # 4 corner products + 3 sums per sampled value
MODULATION_FLOPS = 1  # DCNv2: the sample times its mask value
DEFORM_BACKWARD_FACTOR = 2  # backward FLOPs = 2 x forward FLOPs


def deform_conv2d_flops(
    input_shape: Sequence[int], weight_shape: Sequence[int], output_shape: Sequence[int], modulated: bool = True
) -> int:
    """Forward FLOPs of one ``deform_conv2d`` call (formula in the module docstring).

    Args:
        input_shape: (N, C_in, H, W).
        weight_shape: (C_out, C_in / groups, k_h, k_w).
        output_shape: (N, C_out, H_out, W_out).
        modulated: a mask was given (DCNv2).

    Returns:
        The FLOP count (int).

    Example:
        >>> deform_conv2d_flops((1, 4, 5, 5), (6, 4, 3, 3), (1, 6, 5, 5))
        18000
    """
    n, c_in = int(input_shape[0]), int(input_shape[1])
    c_out, c_in_per_group, k_h, k_w = (int(s) for s in weight_shape)
    positions = n * int(output_shape[-2]) * int(output_shape[-1])
    taps = k_h * k_w
    per_sample = BILINEAR_FLOPS + (MODULATION_FLOPS if modulated else 0)
    return 2 * positions * c_out * c_in_per_group * taps + positions * c_in * taps * per_sample


class DeformConvFlops:
    """Context manager that adds up :func:`deform_conv2d_flops` over every forward call of the
    ``DeformConv2d`` modules inside ``root`` (hooks removed on exit).

    Attributes:
        flops: forward FLOPs seen so far; calls: number of deformable conv calls.
    """

    def __init__(self, root: nn.Module):
        self.root = root
        self.flops = 0
        self.calls = 0
        self._handles = []

    def _hook(self, module: DeformConv2d, args: tuple, kwargs: dict, output) -> None:
        x = args[0] if args else kwargs["input"]
        mask = args[2] if len(args) > 2 else kwargs.get("mask")
        self.flops += deform_conv2d_flops(x.shape, module.weight.shape, output.shape, modulated=mask is not None)
        self.calls += 1

    def __enter__(self) -> "DeformConvFlops":
        self._handles = [
            m.register_forward_hook(self._hook, with_kwargs=True)
            for m in self.root.modules() if isinstance(m, DeformConv2d)
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one counted run.

    Attributes:
        counted: FlopCounterMode's total (forward, plus backward if the run did one).
        deformable: analytic deformable-conv FLOPs (forward, × (1 + DEFORM_BACKWARD_FACTOR)
            when the run did a backward).
        deformable_calls: deformable conv forward calls seen.
    """

    counted: int
    deformable: int
    deformable_calls: int

    @property
    def total(self) -> int:
        return self.counted + self.deformable


def count_flops(fn: Callable[[], Any], root: nn.Module, *, backward: bool = False) -> Tuple[Any, FlopCount]:
    """Runs ``fn()`` once under FlopCounterMode with deformable-conv hooks on ``root``.

    Args:
        fn: the work to count (e.g. a forward, or a forward + ``loss.backward()``).
        root: the module whose ``DeformConv2d`` submodules are hooked.
        backward: ``fn`` back-propagates through those convs (their FLOPs are then tripled).

    Returns:
        (``fn``'s result, :class:`FlopCount`).
    """
    with DeformConvFlops(root) as dcn, FlopCounterMode(display=False) as counter:
        result = fn()
    factor = 1 + DEFORM_BACKWARD_FACTOR if backward else 1
    return result, FlopCount(int(counter.get_total_flops()), dcn.flops * factor, dcn.calls)
