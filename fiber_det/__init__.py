"""fiber-det: FIBER fine-grained detection and phrase grounding as a Detectron2 extension."""
import fiber_det_compat

fiber_det_compat.apply()

__version__ = "0.1.0"

from .config import add_fiber_config  # noqa: E402
from . import modeling  # noqa: E402,F401  (registers FIBER and build_fiber_backbone)
from .data import datasets  # noqa: E402,F401  (registers the built-in datasets)
from .predictor import FIBERPredictor  # noqa: E402
