"""The backbone families a strategy's defaults can depend on (torch-free, so configuration code
can name them without importing torch): ``register_backbone(family=...)`` records one per
registered backbone, :class:`lorax_cil.training.registry.ByBackbone` chooses a value by it."""

from __future__ import annotations

__all__ = ["BACKBONE_FAMILIES"]

#: ``vit``: a transformer over patch tokens; ``cnn``: a convolutional network
BACKBONE_FAMILIES = ("vit", "cnn")
