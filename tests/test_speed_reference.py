"""The speed benchmark's `reference` (official LoRAX) training step: it backpropagates through
every adapter's pass, as the official code does, and computes the toolkit's update."""

from __future__ import annotations

import torch

from lorax_cil.bench import speed
from lorax_cil.models.backbones import create_backbone


def _net(T: int):
    torch.manual_seed(0)
    backbone = create_backbone("vit-test", pretrained=False, img_size=32)
    net = speed._lora_net(speed.CONFIGS["vit-test"], backbone, None)
    speed._grow(net, T)
    return net.train()


def _adapter_grads(net, t):
    return [p.grad for layer in net.ext.layers for p in layer.adapters[t].parameters()]


def test_reference_training_backpropagates_through_every_adapter_pass():
    net = _net(3)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    forward = speed._reference_forward(net, train=True)
    logits, _ = forward(x)
    logits.sum().backward()
    for t in range(3):  # every pass is in the graph: old adapters receive gradients too
        assert all(g is not None and g.abs().sum() > 0 for g in _adapter_grads(net, t)), t
    forward.restore()  # the old adapters are frozen again after the measurement
    for t in range(2):
        for layer in net.ext.layers:
            a = layer.adapters[t]
            assert a.frozen and not any(p.requires_grad for p in a.parameters())
    reference_new = [g.clone() for g in _adapter_grads(net, 2)]

    # the newest adapter's gradient equals the toolkit's (old extractors without autograd)
    net.zero_grad(set_to_none=True)
    net.forward_all(x).logits.sum().backward()
    assert all(g is None for t in range(2) for g in _adapter_grads(net, t))
    for a, b in zip(reference_new, _adapter_grads(net, 2)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
