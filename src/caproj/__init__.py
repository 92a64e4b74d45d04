"""caproj: compress convolutional networks with Cascaded Projection (CaP).

The package reads as a pipeline:
data -> models -> sites -> projection/cap (method) -> surgery -> train (fine-tune)
-> metrics (report).
"""

__version__ = "0.1.0"

from caproj.errors import CaprojError

__all__ = ["CaprojError", "__version__"]
