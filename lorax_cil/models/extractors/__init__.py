"""Extractor kinds of the expandable network: what it adds per task.

The interface and the registry are in :mod:`lorax_cil.models.extractors.base`; each built-in
kind is one module (``lora``, ``mole``, ``full``, ``finetune``, ``frozen``,
``class_attention``, ``side``, ``distilled``). A new kind is one
:class:`Extractor` subclass decorated with ``@register_extractor("name")`` (see
docs/architecture.md), usable at once as ``ExpandableNet(extractor="name")``.
"""

from __future__ import annotations

# registration order = the order error messages list the kinds in
from lorax_cil.models.extractors import lora  # noqa: F401  isort: skip
from lorax_cil.models.extractors import mole  # noqa: F401  isort: skip
from lorax_cil.models.extractors import full  # noqa: F401  isort: skip
from lorax_cil.models.extractors import finetune  # noqa: F401  isort: skip
from lorax_cil.models.extractors import frozen  # noqa: F401  isort: skip
from lorax_cil.models.extractors import class_attention  # noqa: F401  isort: skip
from lorax_cil.models.extractors import side  # noqa: F401  isort: skip
from lorax_cil.models.extractors import distilled  # noqa: F401  isort: skip
from lorax_cil.models.extractors.base import (
    Extractor,
    Tail,
    get_extractor,
    list_extractors,
    register_extractor,
    training_mode,
)
from lorax_cil.models.extractors.full import TailCopy

__all__ = ["Extractor", "Tail", "TailCopy", "get_extractor", "list_extractors", "register_extractor",
           "training_mode"]
