"""lorax-cil: continual synthetic-image attribution.

Importing the package is cheap: torch, timm, open_clip, peft and avalanche are imported only
inside the functions and submodules that need them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
