"""Multi-adapter LoRA layers: group execution oracles, targeting, state and dense deltas."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lorax_cil.models.backbones import create_backbone
from lorax_cil.models.lora import (
    LoraSpec,
    MultiLoRAConv2d,
    MultiLoRALinear,
    adapter_parameters,
    adapter_state_dict,
    add_lora_adapter,
    count_adapter_parameters,
    dense_delta,
    freeze_adapter,
    inject_lora,
    load_adapter_state_dict,
    lora_group,
)


def _randomise_B(layer, index: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w = layer.adapters[index].lora_B.weight
    with torch.no_grad():
        w.copy_(torch.randn(w.shape, generator=g) * 0.5)


def _linear_with_adapters(n: int = 3, dropout: float = 0.0) -> MultiLoRALinear:
    torch.manual_seed(0)
    layer = MultiLoRALinear(nn.Linear(6, 5))
    for i in range(n):
        layer.add_adapter(LoraSpec(r=2 + i, alpha=4.0, dropout=dropout, targets="x"))
        _randomise_B(layer, i, seed=i)
    return layer


# --- spec ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(r=0), "r"),
        (dict(alpha=0), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(init="xavier"), "init"),
        (dict(blocks="first:2"), "blocks"),
        (dict(blocks="last:0"), "blocks"),
        (dict(targets=[]), "targets"),
    ],
)
def test_spec_validation_names_the_option(kwargs, option):
    with pytest.raises(ValueError, match=rf"LoraSpec\.{option}"):
        LoraSpec(**kwargs)


def test_spec_scaling_and_roundtrip():
    assert LoraSpec().scaling == 16.0 / 64
    assert LoraSpec(use_rslora=True).scaling == 16.0 / 8
    spec = LoraSpec(r=8, targets=["a.b", "c"], blocks="last:2")
    assert spec.targets == ("a.b", "c")
    d = spec.to_dict()
    assert d["scaling"] == 2.0 and d["targets"] == ["a.b", "c"]
    assert LoraSpec.from_dict(d) == spec
    with pytest.raises(ValueError, match="unknown keys"):
        LoraSpec.from_dict({"rank": 3})


# --- group execution ----------------------------------------------------------------------------
def test_no_group_is_plain_base_and_zero_B_is_identity():
    layer = _linear_with_adapters()
    x = torch.randn(4, 3, 6)
    base = layer.base(x)
    assert torch.equal(layer(x), base)
    layer.add_adapter(LoraSpec(r=4, dropout=0.0, targets="x"))  # fresh adapter: B = 0
    with lora_group(layer, [3]):
        assert torch.equal(layer(x), base)
    with lora_group(layer, [0]):
        assert not torch.allclose(layer(x), base)
    assert torch.equal(layer(x), base)  # context restored


def test_mixed_group_equals_each_adapter_alone():
    layer = _linear_with_adapters()
    group = [2, None, 0, 1]
    x = torch.randn(8, 3, 6)
    with lora_group(layer, group):
        mixed = layer(x)
    for i, g in enumerate(group):
        xi = x[2 * i : 2 * i + 2]
        if g is None:
            ref = layer(xi)
        else:
            with lora_group(layer, [g]):
                ref = layer(xi)
        torch.testing.assert_close(mixed[2 * i : 2 * i + 2], ref, rtol=0, atol=1e-6)
        direct = layer.base(xi) + (0 if g is None else xi @ dense_delta(layer, g).T)
        torch.testing.assert_close(mixed[2 * i : 2 * i + 2], direct, rtol=1e-5, atol=1e-5)


def test_group_is_scoped_nested_and_checked():
    a, b = _linear_with_adapters(), _linear_with_adapters()
    x = torch.randn(2, 6)
    with lora_group([a], [0]):
        assert torch.equal(b(x), b.base(x))  # other layer untouched
        with lora_group(a, [1]):
            inner = a(x)
        with lora_group(a, [1]):
            assert torch.equal(a(x), inner)
        with lora_group(a, [0]):
            outer = a(x)
        assert torch.equal(a(x), outer)
    with lora_group(a, [0, 1]), pytest.raises(ValueError, match="equal adapter chunks"):
        a(torch.randn(3, 6))
    with lora_group(a, [7]), pytest.raises(IndexError, match="adapter 7"):
        a(x)


def test_forward_has_no_persistent_side_effects():
    layer = _linear_with_adapters(dropout=0.5)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    flags = [p.requires_grad for p in layer.parameters()]
    with lora_group(layer, [0, 1]):
        layer(torch.randn(4, 6)).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    assert flags == [p.requires_grad for p in layer.parameters()]


def test_freeze_adapter_disables_grad_and_dropout():
    root = nn.Sequential(_linear_with_adapters(dropout=0.5))
    layer = root[0]
    freeze_adapter(root, 1)
    assert all(not p.requires_grad for p in adapter_parameters(root, 1))
    assert all(p.requires_grad for p in adapter_parameters(root, 0))
    assert not any(p.requires_grad for p in layer.base.parameters())
    root.train()
    x = torch.randn(16, 6)
    with lora_group(root, [1]):
        assert torch.equal(root(x), root(x))  # frozen: no dropout in training mode
    with lora_group(root, [0]):
        assert not torch.equal(root(x), root(x))  # trainable: dropout active


# --- dense deltas and convolutions -------------------------------------------------------------
def test_linear_dense_delta_matches_forward():
    layer = _linear_with_adapters()
    x = torch.randn(5, 6)
    with lora_group(layer, [1]):
        out = layer(x)
    ref = F.linear(x, layer.base.weight + dense_delta(layer, 1), layer.base.bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert dense_delta(layer, 1).shape == layer.base.weight.shape


@pytest.mark.parametrize("kernel, stride, padding", [(1, 1, 0), (3, 2, 1)])
def test_conv_dense_delta_matches_forward(kernel, stride, padding):
    torch.manual_seed(0)
    layer = MultiLoRAConv2d(nn.Conv2d(4, 6, kernel, stride=stride, padding=padding))
    for i in range(2):
        layer.add_adapter(LoraSpec(r=3, alpha=6.0, dropout=0.0, targets="x"))
        _randomise_B(layer, i, seed=10 + i)
    x = torch.randn(4, 4, 7, 7)
    with lora_group(layer, [1, 0]):
        out = layer(x)
    for j, g in enumerate([1, 0]):
        w = layer.base.weight + dense_delta(layer, g)
        ref = F.conv2d(x[2 * j : 2 * j + 2], w, layer.base.bias, stride=stride, padding=padding)
        torch.testing.assert_close(out[2 * j : 2 * j + 2], ref, rtol=1e-4, atol=1e-5)


def test_conv_refuses_grouped():
    with pytest.raises(ValueError, match="groups=4"):
        MultiLoRAConv2d(nn.Conv2d(4, 4, 3, groups=4))


class _TinyConvNet(nn.Module):
    """EfficientNet-style pointwise / depthwise layers (plain nn.Conv2d)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, 8, 2, stride=2)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 8, 1))
            for _ in range(2)
        )

    def forward(self, x):
        x = self.patch_embed.proj(x)
        for b in self.blocks:
            x = x + b(x)
        return x


def test_pointwise_conv_injection_matches_dense_delta():
    torch.manual_seed(0)
    net = _TinyConvNet().eval()
    presets = {"pointwise": r"blocks\.\d+\.(0|2)$"}
    x = torch.randn(2, 3, 8, 8)
    plain = net(x)
    names = inject_lora(net, LoraSpec(r=2, dropout=0.0, targets="pointwise"), preset_regexes=presets,
                        block_names=["blocks.0", "blocks.1"])
    assert names == ["blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2"]
    assert add_lora_adapter(net, LoraSpec(r=2, dropout=0.0, targets="pointwise")) == 0
    for name in names:
        _randomise_B(net.get_submodule(name), 0, seed=len(name))
    with lora_group(net, [0]):
        adapted = net(x)
    assert torch.equal(net(x), plain)
    with torch.no_grad():  # merge the deltas into the base weights: same function
        for name in names:
            layer = net.get_submodule(name)
            layer.base.weight += dense_delta(layer, 0)
    torch.testing.assert_close(net(x), adapted, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="groups"):
        inject_lora(net, LoraSpec(targets=["blocks.0.1"]))
    # patch_embed.proj is never targeted, even by a catch-all regex
    assert "patch_embed.proj" not in inject_lora(_TinyConvNet(), LoraSpec(targets=r".*(proj|0|2)"))


# --- targeting on the registry backbones --------------------------------------------------------
def test_convit_base_lorax_paper_parameter_count():
    bb = create_backbone("convit_base")
    spec = LoraSpec(r=64, targets="lorax-paper")
    names = inject_lora(bb.model, spec, preset_regexes=bb.lora_target_presets(), block_names=bb.spec.block_names)
    assert len(names) == 20
    assert all(n.endswith(("attn.qk", "attn.v")) for n in names)
    assert add_lora_adapter(bb.model, spec) == 0
    assert count_adapter_parameters(bb.model, 0) == 2_457_600
    # attn on ConViT-base: 10 GPSA x (qk, v, proj) + 2 MHSA x (qkv, proj); never patch_embed.proj
    attn = inject_lora(bb.model, LoraSpec(targets="attn"), preset_regexes=bb.lora_target_presets(),
                       block_names=bb.spec.block_names)
    assert len(attn) == 34 and "patch_embed.proj" not in attn
    assert set(names) <= set(attn)


@pytest.mark.parametrize("name, preset, expected", [("vit-test", "attn", 8), ("convit-test", "attn", 10),
                                                    ("vit-test", "attn+mlp", 16), ("clip-test", "mlp", 6)])
def test_preset_counts_exclude_patch_embed(name, preset, expected):
    bb = create_backbone(name)
    names = inject_lora(bb.model, LoraSpec(targets=preset), preset_regexes=bb.lora_target_presets(),
                        block_names=bb.spec.block_names)
    assert len(names) == expected
    assert not any("patch_embed" in n or n == "conv1" for n in names)


def test_suffix_regex_is_anchored():
    bb = create_backbone("vit-test")
    names = inject_lora(bb.model, LoraSpec(targets=r"attn\.(qk|v)|attn\.qkv"), block_names=bb.spec.block_names)
    assert names == [f"blocks.{i}.attn.qkv" for i in range(4)]
    with pytest.raises(ValueError, match="match no Linear/Conv2d layer.*blocks.0.attn"):
        inject_lora(bb.model, LoraSpec(targets=r"attn\.qk"), block_names=bb.spec.block_names)


def test_blocks_last_k_and_exact_names_and_idempotence():
    bb = create_backbone("vit-test")
    presets = bb.lora_target_presets()
    names = inject_lora(bb.model, LoraSpec(targets="attn", blocks="last:1"), preset_regexes=presets,
                        block_names=bb.spec.block_names)
    assert names == ["blocks.3.attn.qkv", "blocks.3.attn.proj"]
    wrapper = bb.model.get_submodule("blocks.3.attn.qkv")
    again = inject_lora(bb.model, LoraSpec(targets=list(names)), block_names=bb.spec.block_names)
    assert again == names and bb.model.get_submodule("blocks.3.attn.qkv") is wrapper
    assert [add_lora_adapter(bb.model, LoraSpec(r=2)) for _ in range(2)] == [0, 1]
    with pytest.raises(ValueError, match="not Linear/Conv2d"):
        inject_lora(bb.model, LoraSpec(targets=["blocks.3.attn"]), block_names=bb.spec.block_names)
    with pytest.raises(ValueError, match="only 4 candidate blocks"):
        inject_lora(bb.model, LoraSpec(targets="attn", blocks="last:5"), block_names=bb.spec.block_names)


def test_multihead_attention_is_refused_with_hint():
    bb = create_backbone("clip-test")
    with pytest.raises(ValueError, match="MultiheadAttention.*'mlp' preset"):
        inject_lora(bb.model, LoraSpec(targets="attn"), preset_regexes=bb.lora_target_presets(),
                    block_names=bb.spec.block_names)


def test_adapter_state_roundtrip_into_another_slot():
    bb = create_backbone("vit-test")
    spec = LoraSpec(r=2, dropout=0.0, targets="attn")
    inject_lora(bb.model, spec, preset_regexes=bb.lora_target_presets(), block_names=bb.spec.block_names)
    add_lora_adapter(bb.model, spec)
    add_lora_adapter(bb.model, spec)
    for name, m in bb.model.named_modules():
        if isinstance(m, MultiLoRALinear):
            _randomise_B(m, 0, seed=len(name))
    sd = adapter_state_dict(bb.model, 0)
    assert sorted(sd)[:2] == ["blocks.0.attn.proj.lora_A.weight", "blocks.0.attn.proj.lora_B.weight"]
    load_adapter_state_dict(bb.model, 1, sd)
    assert all(torch.equal(v, adapter_state_dict(bb.model, 1)[k]) for k, v in sd.items())
    x = torch.randn(2, 3, 32, 32)
    with lora_group(bb.model, [0, 1]):
        out = bb(torch.cat([x, x]))
    torch.testing.assert_close(out[:2], out[2:], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="missing"):
        load_adapter_state_dict(bb.model, 1, {k: v for k, v in list(sd.items())[1:]})
