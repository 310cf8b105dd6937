"""Models; imported for registration (BACKBONE_REGISTRY, META_ARCH_REGISTRY)."""
from .backbone.fpn import FiberBackbone, build_fiber_backbone
from .backbone.fusion import build_fusion_bottom_up
from .coarse import FiberCoarsePretrain
from .meta_arch import FIBER

__all__ = ["FIBER", "FiberBackbone", "FiberCoarsePretrain", "build_fiber_backbone", "build_fusion_bottom_up"]
