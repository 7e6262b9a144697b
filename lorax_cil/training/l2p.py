"""``l2p``: avalanche-lib's Learning to Prompt (``LearningToPrompt``) on the run's frozen ViT.

Avalanche's ``LearningToPrompt`` builds its own ViT from a short list of names and, with timm
1.0, fails there (``'PretrainedCfg' object is not subscriptable``); its head is hard-coded
``Linear(768, classes)`` and it ignores the image size, so as shipped it only fits a 768-d ViT
at 224 px. We keep Avalanche's algorithm (its ``ViTWithPrompt`` model, prompt pool, key-query
matching loss, class mask and forward) and build the prompted ViT *from the run's backbone*:

* the patch embedding, class token, transformer blocks and final norm are the backbone's own
  modules (shared, frozen), so L2P sees exactly the trunk every other strategy sees;
* the position embedding is the backbone's, extended over the prompt tokens by Avalanche's own
  ``checkpoint_filter_fn`` (the class token's embedding is repeated for the prompts);
* the query function (Avalanche's ``original_vit``) is the frozen backbone itself: its pooled
  class-token feature;
* the head is ``Linear(embed_dim, classes of the scenario)``; logits are restricted to the
  classes seen so far at evaluation (Avalanche's class mask does the same during training).

Requirement (checked before anything trains, :func:`check_l2p_backbone`): a timm
``VisionTransformer`` with a class token, class-token pooling, no pre-norm, no register tokens
and position embeddings on the class token. CNNs (EfficientNet-Lite), ConViT, distilled DeiT and
open_clip towers are refused with an error that names the requirement.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from avalanche.models.timm_vit import ViTWithPrompt, checkpoint_filter_fn
from avalanche.training.supervised import LearningToPrompt
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from lorax_cil.models.base import TaskClassCounts
from lorax_cil.training.avalanche_baselines import (
    ProtocolOptimizer,
    optimizer_settings,
    template_kwargs,
)
from lorax_cil.training.run_protocol import NoMemory, scenario_num_tasks

__all__ = ["L2PNet", "L2PStrategy", "SharedTrunkViTWithPrompt", "check_l2p_backbone",
           "build_l2p_network", "build_l2p"]

ARCH_FORMAT = "lorax-cil/l2p-net"
REQUIREMENT = ("a timm VisionTransformer backbone (vit_*, deit_* without distillation, vit-test) "
               "with a class token, class-token pooling, no pre-norm and no register tokens "
               "(Avalanche's ViTWithPrompt prepends prompts to such a ViT)")


def check_l2p_backbone(backbone: Any) -> None:
    """Raise ``ValueError`` naming the requirement unless L2P can run on ``backbone``."""
    from timm.models.vision_transformer import VisionTransformer

    spec = backbone.spec
    m = getattr(backbone, "model", None)
    problems = []
    if spec.family != "timm" or type(m) is not VisionTransformer:
        problems.append(f"its model is {type(m).__name__} (family {spec.family!r})")
    else:
        if m.cls_token is None or m.global_pool != "token":
            problems.append("it has no class token or does not pool it")
        if not isinstance(m.norm_pre, nn.Identity):
            problems.append("it has a pre-norm")
        if getattr(m, "num_reg_tokens", 0) or m.no_embed_class or m.dynamic_img_size:
            problems.append("it has register tokens, unembedded prefix tokens or dynamic sizes")
    if problems:
        raise ValueError(f"strategy 'l2p' cannot run on backbone {spec.name!r}: "
                         f"{'; '.join(problems)}. It needs {REQUIREMENT}")


class _Query(nn.Module):
    """The frozen backbone as L2P's query model (``{"pre_logits": class-token feature}``)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pre_logits": self.backbone(x)}


_SHARED = ("patch_embed", "blocks", "norm", "fc_norm")


class SharedTrunkViTWithPrompt(ViTWithPrompt):
    """``ViTWithPrompt`` whose shared backbone modules stay in eval mode (a fixed function)."""

    def train(self, mode: bool = True) -> "SharedTrunkViTWithPrompt":
        super().train(mode)
        for name in _SHARED:
            getattr(self, name).eval()
        return self


def _prompted_vit(backbone: Any, *, num_classes: int, pool_size: int, prompt_length: int,
                  top_k: int) -> nn.Module:
    """Avalanche's ``ViTWithPrompt`` sharing the backbone's modules (built with no blocks)."""
    m = backbone.model
    vit = SharedTrunkViTWithPrompt(
        img_size=m.patch_embed.img_size, patch_size=m.patch_embed.patch_size,
        in_chans=m.patch_embed.proj.in_channels, num_classes=num_classes, embed_dim=m.embed_dim,
        depth=0, num_heads=m.blocks[0].attn.num_heads, prompt_length=prompt_length,
        embedding_key="cls", prompt_init="uniform", prompt_pool=True, prompt_key=True,
        pool_size=pool_size, top_k=top_k, batchwise_prompt=False, head_type="prompt",
    )
    pos = checkpoint_filter_fn({"pos_embed": m.pos_embed.detach()}, vit)["pos_embed"]
    for name in _SHARED:
        setattr(vit, name, getattr(m, name))
    vit.cls_token = m.cls_token
    vit.pos_embed = nn.Parameter(pos.clone(), requires_grad=False)
    for n, p in vit.named_parameters():
        p.requires_grad_(n.startswith(("prompt.", "head.")))
    return vit


class L2PNet(TaskClassCounts, nn.Module):
    """L2P's prompted ViT and query model as a run model (see the module docstring).

    Args:
        backbone: the run's frozen timm ViT backbone.
        num_total_classes: classes of the whole scenario (size of the head).
        pool_size: prompts in the pool.
        prompt_length: tokens per prompt.
        top_k: prompts chosen per image.
    """

    def __init__(self, *, backbone: Any, num_total_classes: int, pool_size: int,
                 prompt_length: int, top_k: int) -> None:
        super().__init__()
        check_l2p_backbone(backbone)
        if not 1 <= top_k <= pool_size or prompt_length < 1:
            raise ValueError(f"l2p needs 1 <= top_k <= pool_size and prompt_length >= 1, got "
                             f"top_k={top_k}, pool_size={pool_size}, length={prompt_length}")
        self.backbone = backbone
        self.query = _Query(backbone)
        self.vit = _prompted_vit(backbone, num_classes=int(num_total_classes),
                                 pool_size=pool_size, prompt_length=prompt_length, top_k=top_k)
        self.num_total_classes = int(num_total_classes)
        self.settings = {"pool_size": pool_size, "prompt_length": prompt_length, "top_k": top_k}
        self.task_classes: list[int] = []

    def add_task(self, num_new_classes: int = 2) -> None:
        total = self.num_classes + int(num_new_classes)
        if total > self.num_total_classes:
            raise ValueError(f"L2P was sized for {self.num_total_classes} classes; task "
                             f"{self.num_tasks} would bring the total to {total}")
        self.task_classes.append(int(num_new_classes))

    def train(self, mode: bool = True) -> "L2PNet":
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the classes seen so far (prompts chosen by the frozen query feature)."""
        cls = self.query(x)["pre_logits"]
        res = self.vit(x, task_id=-1, cls_features=cls, train=False)
        return res["logits"][:, : self.num_classes]

    def _learned(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.vit.named_parameters() if n.startswith(("prompt.", "head."))}

    def parameter_report(self) -> dict[str, Any]:
        learned = self._learned()
        prompts = sum(p.numel() for n, p in learned.items() if n.startswith("prompt."))
        head = sum(p.numel() for n, p in learned.items() if n.startswith("head."))
        backbone = sum(p.numel() for p in self.backbone.parameters())
        pos = self.vit.pos_embed.numel()
        return {
            "extractor": "l2p-prompts", "num_tasks": self.num_tasks,
            "trainable_extractor": prompts, "per_extractor": [prompts],
            "head": {"in": self.vit.embed_dim, "out": self.num_total_classes, "params": head},
            "div_head": 0, "backbone": backbone, "prompted_pos_embed": pos,
            "trainable": prompts + head, "total_stored": backbone + pos + prompts + head,
        }

    def learned_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self._learned().items()}

    def load_learned_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        target = self._learned()
        missing, unexpected = sorted(set(target) - set(sd)), sorted(set(sd) - set(target))
        if missing or unexpected:
            raise ValueError(f"l2p state mismatch: missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]}")
        with torch.no_grad():
            for n, p in target.items():
                value = sd[n]
                grown = n.startswith("head.") and value.shape[1:] == p.shape[1:] and (
                    value.shape[0] <= p.shape[0])  # a run resumed with added tasks
                if value.shape != p.shape and not grown:
                    raise ValueError(f"l2p state {n!r}: shape {tuple(value.shape)} != "
                                     f"{tuple(p.shape)}")
                p[: value.shape[0]].copy_(value)

    def architecture(self) -> dict[str, Any]:
        return {"format": ARCH_FORMAT, "version": 1, "backbone": self.backbone.spec.name,
                "num_total_classes": self.num_total_classes, **self.settings,
                "task_classes": list(self.task_classes)}


class L2PStrategy(ProtocolOptimizer, LearningToPrompt):
    """Avalanche ``LearningToPrompt`` on an :class:`L2PNet` with the run's optimiser protocol.

    Avalanche's constructor builds a ViT by name; we call the template constructor directly and
    set the attributes its ``forward`` / ``criterion`` read, so the training step is Avalanche's.
    """

    def __init__(self, *, net: L2PNet, sim_coefficient: float, protocol: dict[str, Any],
                 **kwargs: Any) -> None:
        placeholder = torch.optim.AdamW([nn.Parameter(torch.zeros(1))])
        criterion = nn.CrossEntropyLoss()
        SupervisedTemplate.__init__(self, model=net.vit, optimizer=placeholder,
                                    criterion=criterion, **kwargs)
        self._criterion = criterion
        self.num_classes = net.num_total_classes
        self.lr = protocol["lr"]
        self.sim_coefficient = float(sim_coefficient)
        self.use_cls_features, self.train_prompt_mask = True, False
        self.use_mask, self.use_vit = True, True
        self.original_vit = net.query
        self.run_net = net
        self.memory = NoMemory(strategy="l2p")
        self.setup_protocol(**protocol)

    def _before_training_exp(self, **kwargs: Any) -> None:
        super()._before_training_exp(**kwargs)  # Avalanche swaps in Adam over every parameter
        self.make_optimizer()  # the run's protocol: AdamW over prompts, keys and head

    def train(self, experiences: Any, eval_streams: Any = None, **kwargs: Any) -> Any:
        self.run_net.add_task(len(experiences.classes_in_this_experience))
        return super().train(experiences, eval_streams=[], **kwargs)


def build_l2p_network(cfg: Any, backbone: Any) -> L2PNet:
    b = cfg.baselines
    return L2PNet(backbone=backbone, num_total_classes=2 * scenario_num_tasks(cfg),
                  pool_size=b.l2p_pool_size, prompt_length=b.l2p_prompt_length, top_k=b.l2p_top_k)


def build_l2p(cfg: Any, net: Any, device: Any, evaluator: Any, plugins: list) -> Any:
    return L2PStrategy(net=net, sim_coefficient=cfg.baselines.l2p_sim_coefficient,
                       protocol=optimizer_settings(cfg),
                       **template_kwargs(cfg, device, evaluator, plugins))
