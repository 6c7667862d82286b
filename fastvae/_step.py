"""The classic VAE's training gradients written out by hand, for ``fastvae.train``'s CPU step.

On a small CPU the fixed cost of eager autograd is a large share of a batch-128 step: about 20
graph nodes, each with its Python and dispatch overhead, gradients accumulated through
``AccumulateGrad``, the loss's and the reparameterisation's own autograd wrappers. Here the
forward runs under ``torch.no_grad`` and the backward is the chain rule spelled out, with the same
ATen calls autograd makes for these layers (so the gradients are autograd's, to the bit, on this
machine; ``tests/test_train.py`` checks them against autograd and a float64 oracle):

    x -> h1 = relu(x W1^T + b1) -> mu = h1 W21^T + b21, logvar = h1 W22^T + b22
      -> z = mu + exp(logvar / 2) * eps -> h3 = relu(z W3^T + b3) -> s = h3 W4^T + b4 (logits)
    loss = sum_i [ sum_j BCE(s_ij, x_ij) + beta * KL_i ]

    d s            = sigmoid(s) - x                  (written by the fused loss's forward)
    d W4 = d s^T h3,   d b4 = sum_rows d s,   d h3 = (d s W4) * [h3 > 0]
    d W3 = d h3^T z,   d b3 = sum_rows d h3,  d z  = d h3 W3
    d mu     = d z + beta * mu
    d logvar = d z * eps * exp(logvar / 2) / 2 + beta * (exp(logvar) - 1) / 2
    d W21 = d mu^T h1, d W22 = d logvar^T h1, d h1 = (d mu W21 + d logvar W22) * [h1 > 0]
    d W1 = d h1^T x,   d b1 = sum_rows d h1 (and likewise every bias)

:func:`manual_step_supported` says when this applies: the plain :class:`fastvae.VAE` (not a
subclass), the PyTorch fallback of the loss, float32/float64 weights, one process, eager, no
autocast, the ELBO objective, and no hooks on the model or its parameters. Anything else trains
through autograd.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from . import _backend, _fallback
from .model import VAE


_LAYERS = ("fc1", "fc21", "fc22", "fc3", "fc4")


def _hooked(model: VAE, layers, params) -> bool:
    if (_module._global_forward_hooks or _module._global_forward_pre_hooks
            or _module._global_backward_hooks or _module._global_backward_pre_hooks):
        return True
    for m in (model, *layers):
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return True
    return any(p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None) for p in params)


def manual_step_supported(model: VAE, backend: str) -> bool:
    """True when :func:`vae_elbo_grads` computes what autograd would for this model right now:
    the plain VAE with its five ``nn.Linear`` layers, on the loss's PyTorch fallback, float32 or
    float64 weights needing gradients and holding none yet, no hooks. Checked at every step."""
    if type(model) is not VAE:
        return False
    modules = model._modules
    layers = [modules.get(name) for name in _LAYERS]
    if any(type(m) is not nn.Linear or m.bias is None for m in layers):
        return False
    params = [t for m in layers for t in (m.weight, m.bias)]
    w = params[0]
    dtype = w.dtype
    if dtype not in (torch.float32, torch.float64) or _backend.resolve(backend, w) != "torch":
        return False
    if any(p.grad is not None or not p.requires_grad or p.dtype != dtype for p in params):
        return False
    return not _hooked(model, layers, params)


def vae_elbo_grads(model: VAE, xb: Tensor, beta: float, generator: torch.Generator | None) -> Tensor:
    """One batch's summed negative ELBO (0-dim, detached) with every parameter's ``.grad`` set to
    its gradient: the forward and ``loss.backward()`` of ``FusedELBO(reduction="sum", beta=beta)``
    on ``model(xb, generator=generator)``, the noise drawn from ``generator`` as the fallback's
    :func:`fastvae.reparameterize` draws it."""
    with torch.no_grad():
        x = model.prepare_input(xb)
        l1, l21, l22, l3, l4 = model.fc1, model.fc21, model.fc22, model.fc3, model.fc4
        h1 = torch.relu(torch.addmm(l1.bias, x, l1.weight.t()))
        mu = torch.addmm(l21.bias, h1, l21.weight.t())
        logvar = torch.addmm(l22.bias, h1, l22.weight.t())
        eps = torch.randn(mu.shape, dtype=mu.dtype, device=mu.device, generator=generator)
        std = torch.exp(0.5 * logvar)
        z = torch.addcmul(mu, std, eps)
        h3 = torch.relu(torch.addmm(l3.bias, z, l3.weight.t()))
        s = torch.addmm(l4.bias, h3, l4.weight.t())
        # the fused loss's single pass: the loss (alone) and d s for grad_output 1 (its own
        # buffer), h = exp(logvar) - 1
        args = (1.0, 0.0, float(beta), 0.0, "bernoulli", True, "sum")
        terms, (d_s, _, _), _, h = _fallback._forward(s, x, mu, logvar, None, args, (True, False, False),
                                                      terms=False)
        d_mu_kl, d_logvar_kl = _fallback._kl_grads(mu, h, float(beta))

        l4.weight.grad = torch.mm(d_s.t(), h3)
        l4.bias.grad = d_s.sum(0)
        d_h3 = torch.ops.aten.threshold_backward(torch.mm(d_s, l4.weight), h3, 0)
        l3.weight.grad = torch.mm(d_h3.t(), z)
        l3.bias.grad = d_h3.sum(0)
        d_z = torch.mm(d_h3, l3.weight)
        # z = addcmul(mu, std, eps): d std = d z * eps; std = exp(logvar / 2): d logvar += d std * std / 2
        d_mu = d_z + d_mu_kl
        d_logvar = torch.mul(d_z * eps, std).mul_(0.5).add_(d_logvar_kl)
        l21.weight.grad = torch.mm(d_mu.t(), h1)
        l21.bias.grad = d_mu.sum(0)
        l22.weight.grad = torch.mm(d_logvar.t(), h1)
        l22.bias.grad = d_logvar.sum(0)
        d_h1 = torch.ops.aten.threshold_backward(
            torch.mm(d_mu, l21.weight).add_(torch.mm(d_logvar, l22.weight)), h1, 0)
        l1.weight.grad = torch.mm(d_h1.t(), x)
        l1.bias.grad = d_h1.sum(0)
    return terms[0]
