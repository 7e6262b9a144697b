"""The extractor interface: the registry, the docs example of a new kind, and no kind branches
left in the expandable network."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from lorax_cil.models.backbones import create_backbone
from lorax_cil.models.expandable import ExpandableNet
from lorax_cil.models.extractors import (
    Extractor,
    get_extractor,
    list_extractors,
    register_extractor,
)
from lorax_cil.models.extractors import base as extractor_base

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ["lora", "mole", "full", "finetune", "frozen"]


def test_builtin_kinds_are_registered_classes():
    assert list_extractors()[:5] == BUILTIN
    for name in BUILTIN:
        cls = get_extractor(name)
        assert issubclass(cls, Extractor) and cls.kind == name
    with pytest.raises(ValueError, match="extractor must be one of"):
        get_extractor("der")
    with pytest.raises(ValueError, match="already registered"):
        register_extractor("lora")(type("Again", (Extractor,), {}))
    with pytest.raises(TypeError, match="Extractor subclass"):
        register_extractor("not-a-class")(object)


def _docs_example() -> str:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- extractor-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "docs/architecture.md lost its extractor example"
    return m.group(1)


def test_docs_example_adds_a_working_kind():
    code = _docs_example()
    assert len(code.strip().splitlines()) <= 40
    namespace: dict = {"__name__": "docs_example"}
    try:
        torch.manual_seed(0)  # the example's random backbone, rebuilt below for the round trip
        exec(compile(code, "docs/architecture.md", "exec"), namespace)
        net = namespace["net"]
        assert net.extractor == "residual-map" and isinstance(net.ext, namespace["ResidualMap"])
        # the new kind gets the network's growth, training, state and records for free
        assert not any(p.requires_grad for p in net.extractors[0].parameters())
        assert net.parameter_report()["per_extractor"] == [48 * 48 + 48] * 2
        net.train()
        x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 2, 3, 4])
        out = net.forward_all(x)
        torch.nn.functional.cross_entropy(out.logits, y).backward()
        assert net.extractors[1].weight.grad is not None and net.extractors[0].weight.grad is None
        assert out.div_logits is not None and out.div_logits.shape == (4, 4)
        with torch.no_grad():
            net.extractors[1].weight.normal_(0, 0.1)
        torch.manual_seed(0)
        clone = ExpandableNet.from_architecture(net.architecture(), create_backbone("vit-test"))
        clone.load_learned_state_dict(net.learned_state_dict())
        net.eval()
        clone.eval()
        torch.testing.assert_close(clone(x), net(x), rtol=0, atol=0)
    finally:
        extractor_base._REGISTRY.pop("residual-map", None)


KIND_LITERALS = {"lora", "mole", "full", "finetune", "frozen"}


def _kind_comparisons(tree: ast.AST) -> list[str]:
    """Comparisons (``==``, ``!=``, ``in``, ``not in``) of anything with a kind name literal."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        for operand in [node.left, *node.comparators]:
            values = [operand] + (list(operand.elts) if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [])
            if any(isinstance(v, ast.Constant) and v.value in KIND_LITERALS for v in values):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_branch_on_the_extractor_kind_in_the_network():
    tree = ast.parse((ROOT / "lorax_cil" / "models" / "expandable.py").read_text(encoding="utf-8"))
    assert _kind_comparisons(tree) == []
    # the scan does see such branches (the network before the registry had 22)
    assert _kind_comparisons(ast.parse('if self.extractor in ("lora", "mole"): pass\nx = kind != "full"')) == [
        "line 1: self.extractor in ('lora', 'mole')", "line 2: kind != 'full'"]
