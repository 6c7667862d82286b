"""Reference implementations that fastvae is measured against, written once and shared by the
tests and the benchmarks.

* ``eager_elbo``: the classic loss of PyTorch's VAE example (sigmoid, then
  ``F.binary_cross_entropy`` summed, plus the KL sum), taking decoder logits.
* ``logits_elbo``: the same loss written on logits with ``binary_cross_entropy_with_logits``:
  the formulation handed to ``torch.compile``.
* ``eager_reparameterize``: ``mu + exp(logvar / 2) * randn_like(mu)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def eager_elbo(recon_logits: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """Seed-style loss, summed over the batch: sigmoid + BCE + KL."""
    recon = torch.sigmoid(recon_logits)
    bce = F.binary_cross_entropy(recon, x.view_as(recon), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


def logits_elbo(recon_logits: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """The same loss on logits, summed over the batch: what ``torch.compile`` is given."""
    bce = F.binary_cross_entropy_with_logits(recon_logits, x.view_as(recon_logits), reduction="sum")
    kld = 0.5 * torch.sum(mu.pow(2) + logvar.exp() - 1 - logvar)
    return bce + kld


def eager_reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
    """The classic reparameterisation: noise materialised by ``randn_like``."""
    std = torch.exp(0.5 * logvar)
    return mu + std * torch.randn_like(std)
