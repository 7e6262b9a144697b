"""The binary real/fake detector: frozen backbone + adapter + one-logit head + threshold.

A :class:`Detector` is a one-task :class:`~lorax_cil.models.expandable.ExpandableNet` with a
single output unit (``sigmoid(logit) = P(fake)``) and no divergence head. The adapter is one of

* ``"mole"``: a MoLE adapter (shared LoRA + routed LoRA experts) on the last ``k`` blocks;
* ``"lora"``: one plain LoRA of rank ``lora_rank`` on the same layers;
* ``"linear-probe"``: no adapter (UnivFD's linear probe on frozen features);
* ``"full"``: full fine-tuning of the last ``k`` blocks and the neck (a trainable copy of their
  weights; the frozen backbone is untouched);
* ``"merged"``: no adapter, and some backbone weights replaced by merged ones (written by
  ``lorax-cil merge``: ``theta_0 + tau*`` folded into the backbone, one pass per image). Not
  trainable with ``detect train``.

The frozen first ``L - k`` blocks run without autograd. The decision threshold is chosen on a
calibration split of the source training data and travels with the saved detector.

Detector files are checkpoint folders (:mod:`lorax_cil.training.checkpoint`):
``tensors.safetensors`` holds ``head.weight`` ``(1, D)``, ``head.bias`` ``(1,)`` and the adapter
as ``extractor.0.<layer>.<param>``; ``meta.json`` records how to rebuild the backbone, a
fingerprint of its weights, the adapter configuration, the threshold, the training sources and
the data manifest. :func:`load_detector` rebuilds everything and checks the fingerprint.
A merged detector also stores its replaced backbone tensors as ``backbone.<name>``; the recorded
fingerprint is then the one of the *base* weights ``theta_0`` (checked before the replacement),
and ``meta["backbone_weights"]`` lists the replaced names and the fingerprint after replacement.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from lorax_cil.models.base import BlockBackbone
from lorax_cil.models.expandable import ExpandableNet
from lorax_cil.models.lora import LoraSpec, MultiLoRALayer, dense_delta
from lorax_cil.models.mole import MoleSpec, mole_target_regex
from lorax_cil.utils import strict_from_dict

__all__ = [
    "ADAPTERS",
    "DETECTOR_KIND",
    "DETECTOR_VERSION",
    "BackboneRecipe",
    "AdapterConfig",
    "Detector",
    "backbone_fingerprint",
    "save_detector",
    "load_detector",
    "read_detector_meta",
]

logger = logging.getLogger(__name__)

#: adapters ``detect train`` trains.
ADAPTERS = ("mole", "lora", "linear-probe", "full")
#: the adapter kind of detectors written by ``lorax-cil merge`` (merged weights folded in).
MERGED = "merged"
DETECTOR_KIND = "lorax-cil/detector"
DETECTOR_VERSION = 1
_EXTRACTOR = {"mole": "mole", "lora": "lora", "linear-probe": "frozen", "full": "full", MERGED: "frozen"}
_BACKBONE_PREFIX = "backbone."


@dataclass(frozen=True)
class BackboneRecipe:
    """How to rebuild a backbone: the arguments of ``create_backbone`` plus the init seed.

    Attributes:
        name: registry name (``ViT-L-14``, ``vit-test``, ...).
        pretrained: ``True``, ``False`` or a weights tag.
        weights: local weights file, or ``None``.
        img_size: input resolution override.
        seed: randomly initialised weights are drawn from this seed (the global RNG is untouched).
        options: further keyword options of the backbone factory (e.g. ``{"global_pool": "avg"}``
            for timm, ``{"pool_type": "avg"}`` for ``clip-test``); JSON-serialisable values.
    """

    name: str
    pretrained: bool | str = False
    weights: str | None = None
    img_size: int | None = None
    seed: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)

    def build(self) -> BlockBackbone:
        """Create the backbone (downloads, if any, happen inside timm / open_clip)."""
        from lorax_cil.models.backbones import create_backbone

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return create_backbone(self.name, pretrained=self.pretrained, weights=self.weights,
                                   img_size=self.img_size, **dict(self.options))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["options"] = dict(self.options)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BackboneRecipe":
        return strict_from_dict(cls, d)


@dataclass(frozen=True)
class AdapterConfig:
    """Which adapter the detector trains.

    Attributes:
        kind: ``mole``, ``lora``, ``linear-probe``, ``full`` or ``merged``.
        mole: MoLE ranks, targets, adapted blocks, balance weight. For ``lora`` its ``targets``,
            ``blocks``, ``alpha`` and ``dropout`` place the plain LoRA on the same layers; for
            ``full`` its ``blocks`` are the fine-tuned last blocks.
        lora_rank: rank of the plain LoRA (``kind="lora"``).
    """

    kind: str = "mole"
    mole: MoleSpec = field(default_factory=MoleSpec)
    lora_rank: int = 8

    def __post_init__(self) -> None:
        if self.kind not in (*ADAPTERS, MERGED):
            raise ValueError(f"adapter must be one of {list(ADAPTERS)}, got {self.kind!r}")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise ValueError(f"lora_rank must be a positive int, got {self.lora_rank!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "mole": self.mole.to_dict(), "lora_rank": self.lora_rank}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AdapterConfig":
        return cls(kind=d["kind"], mole=MoleSpec.from_dict(d["mole"]), lora_rank=int(d["lora_rank"]))


def _lora_spec(backbone: BlockBackbone, cfg: AdapterConfig) -> LoraSpec:
    m = cfg.mole
    names = backbone.spec.block_names
    blocks = names if m.blocks is None else names[-m.blocks:]
    regex = mole_target_regex(backbone.model, blocks, m.targets)
    alpha = float(m.alpha) if m.alpha is not None else float(cfg.lora_rank)
    return LoraSpec(r=cfg.lora_rank, alpha=alpha, dropout=m.dropout, targets=regex)


class Detector(nn.Module):
    """Frozen backbone, one adapter, a linear head with one logit, and a decision threshold.

    Args:
        backbone: the frozen backbone (ownership is taken: adapters are injected into it).
        adapter: the adapter configuration.
        threshold: decision threshold on ``P(fake)``; replaced by calibration after training.
        recipe: how the backbone was created (recorded in saved files; required to save).
    """

    def __init__(
        self,
        *,
        backbone: BlockBackbone,
        adapter: AdapterConfig | None = None,
        threshold: float = 0.5,
        recipe: BackboneRecipe | None = None,
    ) -> None:
        super().__init__()
        self.adapter = adapter or AdapterConfig()
        self.recipe = recipe
        self.threshold = float(threshold)
        self.calibration: dict[str, Any] = {}
        #: replaced backbone tensors (``merged`` detectors) and the fingerprint of ``theta_0``.
        self.backbone_overrides: dict[str, torch.Tensor] = {}
        self.base_fingerprint: str | None = None
        kind, m = self.adapter.kind, self.adapter.mole
        frozen = kind in ("linear-probe", MERGED)
        blocks = None if frozen or m.blocks is None else min(m.blocks, backbone.num_blocks)
        self.net = ExpandableNet(
            backbone=backbone,
            extractor=_EXTRACTOR[kind],
            adapt_blocks=blocks,
            lora=_lora_spec(backbone, self.adapter) if kind == "lora" else None,
            mole=m if kind == "mole" else None,
            divergence_head=False,
        )
        self.net.add_task(1)

    @classmethod
    def from_recipe(cls, recipe: BackboneRecipe, adapter: AdapterConfig | None = None,
                    threshold: float = 0.5) -> "Detector":
        """Build the backbone from ``recipe`` and wrap it."""
        return cls(backbone=recipe.build(), adapter=adapter, threshold=threshold, recipe=recipe)

    # --- structure --------------------------------------------------------------------------
    @property
    def backbone(self) -> BlockBackbone:
        return self.net.backbone

    @property
    def head(self) -> nn.Linear:
        return self.net.head

    @property
    def targets(self) -> list[str]:
        """Qualified names (relative to ``backbone.model``) of the adapted layers."""
        return list(self.net.lora_targets)

    # --- forward ----------------------------------------------------------------------------
    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B,)`` and the weighted load-balancing loss (0 outside MoLE training)."""
        out = self.net.forward_all(x)
        aux = out.aux_loss if out.aux_loss is not None else out.logits.new_zeros(())
        return out.logits[:, 0], aux

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B,)``; ``sigmoid(logit)`` is the probability that an image is fake."""
        return self.net(x)[:, 0]

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """``P(fake)`` per image ``(B,)`` in eval mode."""
        was = self.training
        self.eval()
        try:
            return torch.sigmoid(self.forward(x).float())
        finally:
            self.train(was)

    def decide(self, scores: Any) -> np.ndarray:
        """Fake (True) / real decisions of ``P(fake)`` scores at the calibrated threshold."""
        return np.asarray(scores, dtype=np.float64) >= self.threshold

    def train(self, mode: bool = True) -> "Detector":
        super().train(mode)
        self.net.train(mode)
        return self

    # --- parameters -------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_report(self) -> dict[str, Any]:
        """Trainable (adapter, head) and total parameter counts and the trainable fractions."""
        adapter = self.net.extractor_parameter_count(0) if self.net.extractor != "frozen" else 0
        head = sum(p.numel() for p in self.head.parameters())
        total = sum(p.numel() for p in self.parameters())
        return {
            "adapter": self.adapter.kind,
            "adapter_params": adapter,
            "head_params": head,
            "trainable": sum(p.numel() for p in self.trainable_parameters()),
            "backbone_params": total - adapter - head,
            "total": total,
            "fraction_with_head": (adapter + head) / total,
            "fraction_without_head": adapter / total,
        }

    # --- state ------------------------------------------------------------------------------
    def learned_state_dict(self) -> dict[str, torch.Tensor]:
        """``head.weight``, ``head.bias`` and ``extractor.0.<layer>.<param>`` (detached copies)."""
        return self.net.learned_state_dict()

    def load_learned_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        self.net.load_learned_state_dict(sd)

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen backbone weights under their original names (adapters excluded).

        Equal to ``recipe.build().model.state_dict()``: this is ``theta0`` for weight merging.
        """
        model = self.backbone.model
        wrappers = [n for n, m in model.named_modules() if isinstance(m, MultiLoRALayer)]
        out: dict[str, torch.Tensor] = {}
        for name, t in model.state_dict(keep_vars=True).items():
            owner = next((w for w in wrappers if name.startswith(f"{w}.")), None)
            if owner is not None:
                rest = name[len(owner) + 1:]
                if not rest.startswith("base."):
                    continue  # adapter tensors
                name = f"{owner}.{rest[len('base.'):]}"
            out[name] = t.detach()
        return out

    def weight_deltas(self) -> dict[str, torch.Tensor]:
        """Dense weight updates of the adapter keyed like :meth:`base_state_dict`.

        ``lora``: ``scaling * B @ A`` per adapted layer (``<layer>.weight``), so the adapted
        backbone is ``theta0 + delta`` exactly. ``full``: the fine-tuned copy minus ``theta0``
        for every parameter of the adapted blocks and the neck (BatchNorm running statistics
        are buffers: see :meth:`tail_buffers`). ``linear-probe``: ``{}``. ``mole`` has no dense
        equivalent (top-1 routing is token-dependent) and raises ``ValueError``; so does
        ``merged`` (its weights are already folded in).
        """
        if self.adapter.kind == "linear-probe":
            return {}
        if self.adapter.kind == MERGED:
            raise ValueError("a merged detector has no adapter: its merged weights are folded into the "
                             "backbone; merge its sources instead")
        if self.adapter.kind == "full":
            base = dict(self.backbone.model.named_parameters())
            copy = self.net.extractors[0]
            tensors = copy.tensors()
            return {n: (tensors[n].detach() - base[n].detach()).float() for n in copy.param_names}
        if self.adapter.kind == "mole":
            raise ValueError(
                "a MoLE detector routes every token to one expert, so its update has no dense "
                "weight delta; per-branch deltas are available through the layers' "
                "adapters[0].delta_weights(), or train specialists with adapter='lora'"
            )
        model = self.backbone.model
        return {f"{n}.weight": dense_delta(model.get_submodule(n), 0) for n in self.targets}

    def tail_buffers(self) -> dict[str, torch.Tensor]:
        """``full``: the fine-tuned copy's floating-point buffers (BatchNorm running statistics,
        updated by training), keyed like :meth:`base_state_dict`; ``{}`` for other adapters."""
        if self.adapter.kind != "full":
            return {}
        copy = self.net.extractors[0]
        tensors = copy.tensors()
        return {n: tensors[n].detach() for n in copy.buffer_names if torch.is_floating_point(tensors[n])}

    def set_backbone_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Replace backbone tensors (names as in :meth:`base_state_dict`) by merged ones.

        Only for ``merged`` detectors. The fingerprint of the weights before the first
        replacement (``theta_0``) is kept in :attr:`base_fingerprint`.

        Raises:
            ValueError: another adapter kind, an unknown name, or a shape mismatch.
        """
        if self.adapter.kind != MERGED:
            raise ValueError(f"set_backbone_weights is for merged detectors, not adapter {self.adapter.kind!r}")
        state = self.backbone.model.state_dict()
        for k, v in weights.items():
            if k not in state:
                raise ValueError(f"backbone weight {k!r} does not exist in {self.backbone.spec.name!r} "
                                 f"(sample of names: {list(state)[:5]})")
            if tuple(state[k].shape) != tuple(v.shape):
                raise ValueError(f"backbone weight {k!r}: shape {tuple(v.shape)} given, "
                                 f"{tuple(state[k].shape)} expected")
        if self.base_fingerprint is None:
            self.base_fingerprint = backbone_fingerprint(self)
        with torch.no_grad():
            for k, v in weights.items():
                state[k].copy_(v.to(state[k].device, state[k].dtype))
                self.backbone_overrides[k] = state[k].detach().cpu().clone()

    def architecture(self) -> dict[str, Any]:
        return self.net.architecture()


def backbone_fingerprint(detector_or_state: Detector | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, shapes and float32 bytes of the frozen backbone weights."""
    state = (detector_or_state.base_state_dict() if isinstance(detector_or_state, Detector)
             else detector_or_state)
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)}\0".encode())
        h.update(t.numpy())
    return h.hexdigest()


def save_detector(
    detector: Detector,
    folder: str | os.PathLike,
    *,
    training: Mapping[str, Any] | None = None,
    data_manifest: Mapping[str, Any] | None = None,
    merge: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``detector`` as a checkpoint folder (safetensors + JSON, see the module doc).

    ``merge`` (JSON-serialisable) records how a merged detector was made (``meta["merge"]``).
    """
    from lorax_cil.training.checkpoint import save_checkpoint

    if detector.recipe is None:
        raise ValueError("save_detector: the detector has no BackboneRecipe; build it with "
                         "Detector.from_recipe() or pass recipe= so it can be rebuilt")
    s = detector.backbone.spec
    meta = {
        "kind": DETECTOR_KIND,
        "detector_version": DETECTOR_VERSION,
        "backbone": {
            "recipe": detector.recipe.to_dict(),
            "name": s.name, "family": s.family, "weights": s.weights,
            "feature_dim": s.feature_dim, "input_size": s.input_size, "num_blocks": s.num_blocks,
            "mean": list(s.mean), "std": list(s.std), "interpolation": s.interpolation,
            "fingerprint_sha256": detector.base_fingerprint or backbone_fingerprint(detector),
        },
        "adapter": detector.adapter.to_dict(),
        "targets": detector.targets,
        "architecture": detector.architecture(),
        "head": {"in_features": detector.head.in_features, "out_features": 1,
                 "output": "sigmoid(logit) = P(fake)"},
        "threshold": detector.threshold,
        "calibration": dict(detector.calibration),
        "parameters": detector.parameter_report(),
        "training": dict(training or {}),
        "data_manifest": dict(data_manifest or {}),
    }
    tensors = detector.learned_state_dict()
    if detector.backbone_overrides:
        meta["backbone_weights"] = {"replaced": sorted(detector.backbone_overrides),
                                    "fingerprint_sha256": backbone_fingerprint(detector)}
        tensors.update({_BACKBONE_PREFIX + k: v for k, v in detector.backbone_overrides.items()})
    if merge is not None:
        meta["merge"] = dict(merge)
    return save_checkpoint(folder, tensors, meta)


def read_detector_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """``meta.json`` of a detector folder, validated (no tensors are read)."""
    from lorax_cil.training.checkpoint import CheckpointError, read_checkpoint_meta

    meta = read_checkpoint_meta(folder)
    if meta.get("kind") != DETECTOR_KIND:
        raise CheckpointError(f"{folder} is a checkpoint but not a detector (kind {meta.get('kind')!r})")
    if int(meta.get("detector_version", 0)) > DETECTOR_VERSION:
        raise CheckpointError(f"{folder}: detector version {meta['detector_version']} is newer than "
                              f"this lorax-cil reads ({DETECTOR_VERSION})")
    return meta


def load_detector(
    folder: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    backbone: BlockBackbone | None = None,
    check_fingerprint: bool = True,
) -> Detector:
    """Rebuild a detector saved by :func:`save_detector`.

    Args:
        folder: the detector folder.
        device: where to put the detector.
        backbone: an already built backbone to use instead of rebuilding it from the recipe
            (a fresh one: adapters are injected into it).
        check_fingerprint: refuse a backbone whose weights differ from the saved fingerprint.

    Raises:
        CheckpointError: not a detector, damaged file, or backbone weights that do not match.
    """
    from lorax_cil.training.checkpoint import CheckpointError, load_checkpoint
    from lorax_cil.training.integrity import validate_detector_meta

    read_detector_meta(folder)
    tensors, meta = load_checkpoint(folder)
    validate_detector_meta(meta, folder)  # keys, threshold, sizes, no pickle path: before building
    recipe = BackboneRecipe.from_dict(meta["backbone"]["recipe"])
    bb = backbone if backbone is not None else recipe.build()
    if bb.spec.name != meta["backbone"]["name"]:
        raise CheckpointError(f"{folder}: backbone {bb.spec.name!r} given, detector needs "
                              f"{meta['backbone']['name']!r}")
    det = Detector(backbone=bb, adapter=AdapterConfig.from_dict(meta["adapter"]),
                   threshold=float(meta["threshold"]), recipe=recipe)
    if det.targets != list(meta["targets"]):
        raise CheckpointError(f"{folder}: adapted layers differ from the saved ones")
    if check_fingerprint:
        fp = backbone_fingerprint(det)
        if fp != meta["backbone"]["fingerprint_sha256"]:
            raise CheckpointError(
                f"{folder}: the rebuilt backbone {recipe.name!r} (weights {bb.spec.weights}) differs "
                "from the one the detector was trained on (fingerprint mismatch); pass the "
                "original backbone or weights file"
            )
    replaced = {k[len(_BACKBONE_PREFIX):]: v for k, v in tensors.items() if k.startswith(_BACKBONE_PREFIX)}
    if replaced:
        det.base_fingerprint = meta["backbone"]["fingerprint_sha256"] if check_fingerprint else None
        listed = (meta.get("backbone_weights") or {}).get("replaced")
        if listed != sorted(replaced):
            raise CheckpointError(f"{folder}: the replaced backbone tensors differ from those meta.json lists")
        det.set_backbone_weights(replaced)
        if check_fingerprint and backbone_fingerprint(det) != meta["backbone_weights"]["fingerprint_sha256"]:
            raise CheckpointError(f"{folder}: the merged backbone weights do not match their recorded "
                                  "fingerprint")
    det.load_learned_state_dict({k: v for k, v in tensors.items() if not k.startswith(_BACKBONE_PREFIX)})
    det.calibration = dict(meta.get("calibration", {}))
    return det.to(device).eval()
