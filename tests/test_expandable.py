"""ExpandableNet invariants: freezing, head growth, trunk sharing, batched groups, state round trips."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lorax_cil.models.backbones import create_backbone
from lorax_cil.models.base import BackboneSpec, BlockBackbone
from lorax_cil.models.expandable import ExpandableNet
from lorax_cil.models.lora import LoraSpec, count_adapter_parameters, lora_group

KINDS = ["lora", "full", "finetune", "frozen"]


# --- a tiny EfficientNet-style CNN (BatchNorm, plain pointwise nn.Conv2d) -----------------------
class _MBConv(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.expand, self.bn_e = nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c)
        self.dw, self.bn_d = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c, bias=False), nn.BatchNorm2d(2 * c)
        self.project, self.bn_p = nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        h = F.relu6(self.bn_e(self.expand(x)))
        h = F.relu6(self.bn_d(self.dw(h)))
        return x + self.bn_p(self.project(h))


class TinyCNN(BlockBackbone):
    @classmethod
    def lora_target_presets(cls) -> dict[str, str]:
        pw = r"blocks\.\d+\.(expand|project)"
        return {"pointwise": rf"{pw}$", "pointwise+head": rf"({pw}|conv_head)$"}

    def stem(self, x):
        return F.relu6(self.model.bn0(self.model.conv_stem(x)))

    def neck(self, h):
        h = F.relu6(self.model.bn1(self.model.conv_head(h)))
        return F.adaptive_avg_pool2d(h, 1).flatten(1)


def tiny_cnn() -> TinyCNN:
    m = nn.Module()
    m.conv_stem, m.bn0 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
    m.blocks = nn.ModuleList(_MBConv(8) for _ in range(3))
    m.conv_head, m.bn1 = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
    for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    spec = BackboneSpec(name="tiny-cnn", family="test", feature_dim=16, input_size=16,
                        block_names=("blocks.0", "blocks.1", "blocks.2"))
    return TinyCNN(model=m, spec=spec)


# --- helpers --------------------------------------------------------------------------------
def make_net(kind: str, *, backbone: str = "vit-test", k: int | None = None, targets: str = "attn+mlp",
             dropout: float = 0.0, **kwargs) -> ExpandableNet:
    torch.manual_seed(0)
    bb = tiny_cnn() if backbone == "tiny-cnn" else create_backbone(backbone)
    lora = LoraSpec(r=4, alpha=8.0, dropout=dropout, targets=targets) if kind == "lora" else None
    return ExpandableNet(backbone=bb, extractor=kind, adapt_blocks=k, lora=lora, **kwargs)


def images(n: int = 4, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def train_steps(net: ExpandableNet, *, steps: int = 3, size: int = 32, all_params: bool = False) -> None:
    """AdamW with weight decay; ``all_params`` mimics Avalanche (frozen tensors in the optimiser)."""
    params = list(net.parameters()) if all_params else net.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5)
    net.train()
    for s in range(steps):
        x = images(6, size, seed=100 + s)
        y = torch.randint(0, net.num_classes, (6,), generator=torch.Generator().manual_seed(s))
        out = net.forward_all(x)
        loss = F.cross_entropy(out.logits, y)
        if out.div_logits is not None:
            loss = loss + 0.1 * F.cross_entropy(out.div_logits, net.divergence_targets(y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def base_state(net: ExpandableNet) -> dict[str, torch.Tensor]:
    """Backbone parameters and buffers, LoRA adapters excluded."""
    sd = net.backbone.state_dict()
    return {k: v.clone() for k, v in sd.items() if ".adapters." not in k}


# --- freezing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, backbone, k", [("lora", "vit-test", None), ("lora", "vit-test", 2),
                                               ("full", "vit-test", 2), ("lora", "tiny-cnn", None),
                                               ("full", "tiny-cnn", 2)])
def test_old_extractors_backbone_and_trunk_stay_bit_identical(kind, backbone, k):
    targets = "pointwise+head" if backbone == "tiny-cnn" else "attn+mlp"
    size = 16 if backbone == "tiny-cnn" else 32
    net = make_net(kind, backbone=backbone, k=k, targets=targets)
    before = base_state(net)
    frozen: dict[int, dict[str, torch.Tensor]] = {}
    for t in range(3):
        net.add_task(2)
        if t:
            frozen[t - 1] = net.extractor_state_dict(t - 1)
        newest = net.extractor_state_dict(t)
        train_steps(net, size=size, all_params=True)
        assert any(not torch.equal(v, net.extractor_state_dict(t)[n]) for n, v in newest.items())
    after = base_state(net)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before), "backbone (trunk, BN stats) moved"
    for t, sd in frozen.items():
        now = net.extractor_state_dict(t)
        assert all(torch.equal(v, now[n]) for n, v in sd.items()), f"extractor {t} moved"
    trainable = {id(p) for p in net.trainable_parameters()}
    assert trainable == {id(p) for p in _newest_params(net)} | {id(p) for p in net.head.parameters()} | (
        {id(p) for p in net.div_head.parameters()})


def _newest_params(net):
    if net.extractor == "full":
        return list(net.extractors[-1].parameters())
    from lorax_cil.models.lora import adapter_parameters

    return adapter_parameters(net.backbone.model, net.num_tasks - 1)


def test_full_copies_are_independent_and_start_from_the_previous():
    net = make_net("full", k=2)
    net.add_task(2)
    train_steps(net)
    net.add_task(2)
    a, b = net.extractors[0].tensors(), net.extractors[1].tensors()
    assert all(torch.equal(a[n], b[n]) for n in a)  # DER / MEMO: the new copy starts from the last
    base = {t.data_ptr() for t in net.backbone.state_dict().values()}
    assert not {t.data_ptr() for t in a.values()} & {t.data_ptr() for t in b.values()}
    assert not base & {t.data_ptr() for t in b.values()}
    assert "cls_token" not in a and "norm.weight" in a and "blocks.2.attn.qkv.weight" in a
    assert not any(n.startswith(("blocks.0.", "blocks.1.", "patch_embed")) for n in a)


# --- head and divergence head ------------------------------------------------------------------
def test_head_expansion_copies_the_old_block_and_adds_fresh_units():
    net = make_net("lora")
    net.add_task(2)
    train_steps(net)
    w, b = net.head.weight.detach().clone(), net.head.bias.detach().clone()
    D = net.feature_dim
    net.add_task(3)
    assert net.head.weight.shape == (5, 2 * D) and net.head.bias.shape == (5,)
    assert torch.equal(net.head.weight[:2, :D], w) and torch.equal(net.head.bias[:2], b)
    assert net.head.weight[:2, D:].abs().sum() > 0 and net.head.weight[2:].abs().sum() > 0
    assert net.head.weight.requires_grad and net.class_offsets() == [0, 2]
    finetune = make_net("finetune")
    finetune.add_task(2)
    finetune.add_task(2)
    assert finetune.head.weight.shape == (4, D) and finetune.num_features == D


def test_divergence_head_sizes_and_targets():
    net = make_net("lora")
    net.add_task(2)
    assert net.div_head is None and net.forward_all(images()).div_logits is None  # task 0: none
    net.add_task(3)
    assert (net.div_head.in_features, net.div_head.out_features) == (net.feature_dim, 4)
    assert net.forward_all(images()).div_logits.shape == (4, 4)
    assert net.divergence_targets(torch.tensor([0, 1, 2, 3, 4])).tolist() == [0, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="labels must be in"):
        net.divergence_targets(torch.tensor([5]))
    off = make_net("lora", divergence_head=False)
    off.add_task(2)
    off.add_task(2)
    assert off.div_head is None
    frozen = make_net("frozen")
    frozen.add_task(2)
    frozen.add_task(2)
    assert frozen.div_head is None


# --- execution ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_trunk_runs_once_per_image_regardless_of_tasks(kind):
    net = make_net(kind, k=2)
    for _ in range(3):
        net.add_task(2)
    sizes: dict[str, list[int]] = {}
    mods = {"stem": net.backbone.model.patch_embed} | {f"b{i}": b for i, b in enumerate(net.backbone.blocks())}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: sizes.setdefault(n, []).append(a[0].shape[0]))
             for n, m in mods.items()]
    for mode, cap in ((False, None), (True, None), (False, 3), (True, 3)):
        sizes.clear()
        net.train(mode)
        net.max_group_size = cap  # None: one adapter at a time on CPU (all at once on CUDA)
        net(images(2))
        assert sizes["stem"] == sizes["b0"] == sizes["b1"] == [2]
        assert sum(sizes["b2"]) == sum(sizes["b3"]) == 6
        if kind == "lora":
            batched = [4, 2] if mode else [6]  # old adapters batched, newest alone
            assert sizes["b2"] == (batched if cap else [2, 2, 2])
    for h in hooks:
        h.remove()


def test_batched_group_equals_each_adapter_alone():
    net = make_net("lora", k=3)
    for _ in range(3):
        net.add_task(2)
        train_steps(net, steps=1)
    net.eval()
    x = images(3)
    feats = net.forward_all(x).features
    bb, D = net.backbone, net.feature_dim
    for t in range(3):
        with torch.no_grad(), lora_group(bb.model, [t]):
            alone = bb(x)
        torch.testing.assert_close(feats[:, t * D : (t + 1) * D], alone, rtol=0, atol=1e-5)
    with torch.no_grad():
        plain = bb(x)  # outside any group: the plain frozen backbone
    assert not torch.allclose(plain, feats[:, :D])
    net.max_group_size = 1
    torch.testing.assert_close(net.forward_all(x).features, feats, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_train_and_eval_forward_agree_without_dropout(kind):
    net = make_net(kind, k=3)
    for _ in range(3):
        net.add_task(2)
        train_steps(net, steps=1)
    x = images(4)
    net.train()
    train_out = net.forward_all(x)
    net.eval()
    eval_out = net.forward_all(x)
    torch.testing.assert_close(train_out.logits, eval_out.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(net.features_for_herding(x), eval_out.features, rtol=0, atol=1e-5)
    assert net.features_for_herding(x).shape == (4, net.num_features)


def test_frozen_features_are_the_plain_backbone():
    net = make_net("frozen")
    net.add_task(2)
    net.eval()
    x = images(2)
    torch.testing.assert_close(net.forward_all(x).features, net.backbone(x), rtol=0, atol=1e-6)
    assert {id(p) for p in net.trainable_parameters()} == {id(p) for p in net.head.parameters()}


def test_finetune_extractor_keeps_training_across_tasks():
    net = make_net("finetune", k=2)
    net.add_task(2)
    train_steps(net)
    after0 = net.extractor_state_dict(0)
    net.add_task(2)
    assert all(p.requires_grad for p in net.extractors[0].parameters())
    train_steps(net)
    assert any(not torch.equal(v, net.extractor_state_dict(0)[n]) for n, v in after0.items())
    assert len(net.extractors) == 1


# --- reports, state, architecture ---------------------------------------------------------------
def test_parameter_report():
    net = make_net("lora", k=2)
    plain = sum(p.numel() for p in create_backbone("vit-test").parameters())
    for _ in range(2):
        net.add_task(2)
    rep = net.parameter_report()
    newest = count_adapter_parameters(net.backbone.model, 1)
    head = net.head.weight.numel() + net.head.bias.numel()
    div = net.div_head.weight.numel() + net.div_head.bias.numel()
    assert rep["trainable_extractor"] == newest and rep["per_extractor"] == [newest, newest]
    assert rep["backbone"] == plain and rep["head"] == {"in": 2 * 48, "out": 4, "params": head}
    assert rep["trainable"] == newest + head + div
    assert rep["total_stored"] == plain + 2 * newest + head + div
    assert json.dumps(rep)


@pytest.mark.parametrize("kind, backbone", [(k, "vit-test") for k in KINDS] + [("lora", "convit-test"),
                                                                                 ("full", "tiny-cnn")])
def test_from_architecture_and_state_reproduce_outputs(kind, backbone, tmp_path):
    from safetensors.torch import load_file, save_file

    targets = "pointwise" if backbone == "tiny-cnn" else "attn"
    size = 16 if backbone == "tiny-cnn" else 32
    net = make_net(kind, backbone=backbone, k=2, targets=targets)
    pristine = copy.deepcopy(net.backbone)  # rebuilt backbone (weights from the registry/a file)
    if kind == "lora":
        pristine = make_net("frozen", backbone=backbone).backbone
    for n in (2, 3):
        net.add_task(n)
        train_steps(net, size=size)
    arch = json.loads(json.dumps(net.architecture()))
    save_file(net.learned_state_dict(), tmp_path / "state.safetensors")
    rebuilt = ExpandableNet.from_architecture(arch, pristine)
    rebuilt.load_learned_state_dict(load_file(tmp_path / "state.safetensors"))
    net.eval()
    rebuilt.eval()
    x = images(3, size)
    a, b = net.forward_all(x), rebuilt.forward_all(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.features, b.features)
    assert (a.div_logits is None) == (b.div_logits is None)
    assert rebuilt.architecture() == arch


def test_state_and_architecture_errors():
    net = make_net("lora")
    net.add_task(2)
    with pytest.raises(ValueError, match="missing"):
        net.load_extractor_state_dict(0, {})
    with pytest.raises(IndexError):
        net.extractor_state_dict(1)
    arch = net.architecture()
    with pytest.raises(ValueError, match="backbone"):
        ExpandableNet.from_architecture(arch, create_backbone("convit-test"))
    frozen = make_net("frozen")
    frozen.add_task(2)
    with pytest.raises(ValueError, match="no per-task extractors"):
        frozen.extractor_state_dict(0)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(extractor="der"), "extractor must be one of"), (dict(adapt_blocks=5), "adapt_blocks"),
     (dict(adapt_blocks=0), "adapt_blocks"), (dict(extractor="full", lora=LoraSpec()), "only used with")],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExpandableNet(backbone=create_backbone("vit-test"), **kwargs)


def test_no_task_and_lora_restricted_to_adapted_blocks():
    net = make_net("lora", k=1, targets="attn")
    assert net.lora_targets == ["blocks.3.attn.qkv", "blocks.3.attn.proj"]
    with pytest.raises(RuntimeError, match="add_task"):
        net(images())
    with pytest.raises(ValueError, match="only 1 candidate blocks"):
        ExpandableNet(backbone=create_backbone("vit-test"), adapt_blocks=1,
                      lora=LoraSpec(targets="attn", blocks="last:2"))
    cnn = make_net("lora", backbone="tiny-cnn", targets="pointwise+head")
    assert "conv_head" in cnn.lora_targets  # neck layers are part of every extractor's tail


def test_dropout_only_on_the_trainable_adapter():
    net = make_net("lora", dropout=0.5)
    for _ in range(2):
        net.add_task(2)
        train_steps(net, steps=1)
    x = images(8)
    D = net.feature_dim
    net.train()
    a, b = net.forward_all(x).features, net.forward_all(x).features
    assert torch.equal(a[:, :D], b[:, :D])  # frozen adapter: a fixed function
    assert not torch.equal(a[:, D:], b[:, D:])  # newest adapter: dropout active
    net.eval()
    assert torch.equal(net.forward_all(x).features, net.forward_all(x).features)
