"""Reference implementations that fastvae is measured against, written once and shared by the
tests and the benchmarks.

* ``eager_elbo``: the classic loss of PyTorch's VAE example (sigmoid, then
  ``F.binary_cross_entropy`` summed, plus the KL sum), taking decoder logits.
* ``logits_elbo``: the same loss written on logits with ``binary_cross_entropy_with_logits``:
  the formulation handed to ``torch.compile``.
* ``eager_reparameterize``: ``mu + exp(logvar / 2) * randn_like(mu)``.
* ``eager_gaussian_elbo`` / ``gaussian_elbo``: a Gaussian decoder, ``-Normal(recon, sigma).log_prob(x)``
  summed plus the KL, as a user writes it (torch.distributions, with its argument validation),
  and the same loss written out for ``torch.compile`` (no validation: it would sync the host).
* ``eager_cb_elbo`` / ``cb_elbo``: the continuous Bernoulli on logits through
  ``torch.distributions.ContinuousBernoulli``, with and without argument validation.
"""
from __future__ import annotations

import math

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


def _kl_sum(mu: Tensor, logvar: Tensor) -> Tensor:
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def eager_gaussian_elbo(recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, sigma=1.0) -> Tensor:
    """Gaussian decoder N(x; recon, sigma^2), summed over the batch: ``-Normal.log_prob`` + KL."""
    nll = -torch.distributions.Normal(recon, sigma).log_prob(x.view_as(recon)).sum()
    return nll + _kl_sum(mu, logvar)


def gaussian_elbo(recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, sigma=1.0) -> Tensor:
    """The same loss written out (what ``torch.compile`` is given)."""
    log_sigma = torch.log(sigma) if isinstance(sigma, Tensor) else math.log(sigma)
    z = (x.view_as(recon) - recon) / sigma
    nll = (0.5 * z * z + log_sigma + 0.5 * math.log(2 * math.pi)).sum()
    return nll + _kl_sum(mu, logvar)


def eager_cb_elbo(recon_logits: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """Continuous-Bernoulli decoder on logits, summed over the batch: ``-log_prob`` + KL."""
    nll = -torch.distributions.ContinuousBernoulli(logits=recon_logits).log_prob(x.view_as(recon_logits)).sum()
    return nll + _kl_sum(mu, logvar)


def cb_elbo(recon_logits: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """The same loss without argument validation (what ``torch.compile`` is given)."""
    d = torch.distributions.ContinuousBernoulli(logits=recon_logits, validate_args=False)
    return -d.log_prob(x.view_as(recon_logits)).sum() + _kl_sum(mu, logvar)


def eager_reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
    """The classic reparameterisation: noise materialised by ``randn_like``."""
    std = torch.exp(0.5 * logvar)
    return mu + std * torch.randn_like(std)


def seed_loader(images: Tensor, labels: Tensor, batch_size: int = 128, shuffle: bool = True):
    """The seed's input pipeline: a ``TensorDataset`` of float images in [0, 1] behind a ``DataLoader``."""
    from torch.utils.data import DataLoader, TensorDataset

    x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    return DataLoader(TensorDataset(x, labels), batch_size=batch_size, shuffle=shuffle)


def _seed_loss(model, data: Tensor) -> Tensor:
    mu, logvar = model.encode(data)
    recon_logits = model.decode_logits(eager_reparameterize(mu, logvar))
    return eager_elbo(recon_logits, data, mu, logvar)


def seed_train_epoch(model, loader, optimizer, device="cpu") -> float:
    """One epoch of the seed's loop: per-batch ``.to(device)``, eager loss, Adam, ``loss.item()`` per step.

    ``model`` is a :class:`fastvae.VAE` (the seed's architecture); returns the mean loss per image.
    """
    model.train()
    total = 0.0
    for data, _ in loader:
        data = data.to(device)
        optimizer.zero_grad()
        loss = _seed_loss(model, data)
        loss.backward()
        total += loss.item()
        optimizer.step()
    return total / len(loader.dataset)


@torch.no_grad()
def seed_test(model, loader, device="cpu") -> float:
    """The seed's "Test set loss": mean negative ELBO per test image, one z sample each."""
    model.eval()
    total = 0.0
    for data, _ in loader:
        total += _seed_loss(model, data.to(device)).item()
    return total / len(loader.dataset)
