"""FIBER's coarse-grained image-text model; imported for registration (META_ARCH_REGISTRY)."""
from .meta_arch import FiberCoarsePretrain

__all__ = ["FiberCoarsePretrain"]
