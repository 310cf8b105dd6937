"""Models; imported for registration (BACKBONE_REGISTRY, META_ARCH_REGISTRY)."""
from .backbone.fpn import FiberBackbone, build_fiber_backbone
from .meta_arch import FIBER

__all__ = ["FIBER", "FiberBackbone", "build_fiber_backbone"]
