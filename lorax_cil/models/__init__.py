"""Models: block-structured backbones, LoRA / MoLE layers, extractor kinds, the expandable network.

    from lorax_cil.models import ExpandableNet, create_backbone

Importing this package is cheap; the names below are loaded (with torch) on first use.
"""

from __future__ import annotations

from lorax_cil.lazy import lazy_exports

_EXPORTS = {
    "ExpandableNet": "expandable",
    "ExpandableOutput": "expandable",
    "create_backbone": "backbones",
    "list_backbones": "backbones",
    "register_backbone": "backbones",
    "BackboneSpec": "base",
    "BlockBackbone": "base",
    "LoraSpec": "lora",
    "MoleSpec": "mole",
    "Extractor": "extractors",
    "Tail": "extractors",
    "register_extractor": "extractors",
    "get_extractor": "extractors",
    "list_extractors": "extractors",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
