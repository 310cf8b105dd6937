"""fiber-det: FIBER fine-grained detection and phrase grounding as a Detectron2 extension."""
from . import compat

compat.apply()

__version__ = "0.1.0"
