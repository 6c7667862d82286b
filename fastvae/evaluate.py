"""Evaluation: the test ELBO with one z sample, and the importance-weighted bound of log p(x).

The IWAE bound with K samples (Burda et al., 2016):
``log p(x) >= E[log (1/K) sum_k p(x, z_k) / q(z_k | x)]``, z_k ~ q(z | x), computed with
``logsumexp``. Samples and images are batched together in chunks of at most ``max_elements``
decoder outputs, so K = 5000 runs in bounded memory without a loop over single images.
"""
from __future__ import annotations

import math
import sys
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import Dataset
from .functional import elbo_loss
from .model import VAE

LOG_2PI = math.log(2.0 * math.pi)


def _images(data: Union[Tensor, Dataset], device: torch.device) -> Tensor:
    x = data.test_x if isinstance(data, Dataset) else data
    if not isinstance(x, Tensor):
        raise TypeError(f"data must be a fastvae Dataset or a tensor of images, got {type(x).__name__}")
    if x.shape[0] == 0:
        raise ValueError("evaluate needs at least one image")
    return x.to(device)


@torch.no_grad()
def neg_elbo_sum(model: VAE, x: Tensor, generator: Optional[torch.Generator] = None,
                 chunk: int = 2048) -> Tensor:
    """Sum over images of the negative ELBO (beta = 1), one z sample each; a 0-dim device tensor."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for xc in x.split(chunk):
        logits, mu, logvar = model(xc, generator=generator)
        total += elbo_loss(logits, xc, mu, logvar, reduction="sum", beta=1.0, backend=model.backend)
    return total


@torch.no_grad()
def iw_log_likelihood(model: VAE, x: Tensor, iw_samples: int, generator: Optional[torch.Generator] = None,
                      max_elements: int = 1 << 24, progress: bool = False) -> Tensor:
    """Per-image IWAE estimate of log p(x) in nats with ``iw_samples`` samples: float64 [N].
    ``progress`` shows a bar over the images on stderr."""
    if iw_samples < 1:
        raise ValueError(f"iw_samples must be >= 1, got {iw_samples}")
    d, L = model.input_dim, model.latent_dim
    xs = model.prepare_input(x)
    out = torch.empty(xs.shape[0], dtype=torch.float64, device=x.device)
    k_chunk = max(1, min(iw_samples, max_elements // d))           # samples per chunk
    b_chunk = max(1, max_elements // (k_chunk * d))                 # images per chunk
    from tqdm.auto import tqdm

    bar = tqdm(total=xs.shape[0], desc=f"IWAE bound, K={iw_samples}", unit="image", disable=not progress,
               leave=True, dynamic_ncols=True, file=sys.stderr)
    for start in range(0, xs.shape[0], b_chunk):
        xb = xs[start:start + b_chunk]                              # [b, d]
        mu, logvar = model.encode(xb)                               # [b, L]
        std = torch.exp(0.5 * logvar)
        # log q(z|x) - log p(z) = sum(-(eps^2)/2 - logvar/2 + z^2/2); the log 2pi terms cancel
        log_w_parts = []
        for k0 in range(0, iw_samples, k_chunk):
            k = min(k_chunk, iw_samples - k0)
            eps = torch.randn(k, *mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
            z = mu + std * eps                                      # [k, b, L]
            logits = model.decode_logits(z)                         # [k, b, d]
            log_px_z = (logits * xb).sum(-1) - F.softplus(logits).sum(-1)
            log_pz_minus_qz = 0.5 * (eps.square() + logvar - z.square()).sum(-1)
            log_w_parts.append((log_px_z + log_pz_minus_qz).double())
        log_w = torch.cat(log_w_parts)                              # [K, b]
        out[start:start + xb.shape[0]] = torch.logsumexp(log_w, 0) - math.log(iw_samples)
        bar.update(xb.shape[0])
    bar.close()
    return out


@torch.no_grad()
def evaluate(model: VAE, data: Union[Tensor, Dataset], iw_samples: int = 0,
             generator: Optional[torch.Generator] = None, max_elements: int = 1 << 24,
             progress: bool = False) -> dict:
    """Test-set figures of a trained VAE.

    Args:
        model: a :class:`fastvae.VAE`.
        data: a :class:`fastvae.data.Dataset` (its test split is used) or images [N, ...].
        iw_samples: K for the importance-weighted bound of log p(x); 0 skips it. K up to a few
            thousand is fine: memory stays under ``max_elements`` decoder outputs per chunk.
        generator: torch generator for the z samples (reproducible figures).
        progress: a progress bar on stderr over the images of the IWAE bound (K = 5000 on 10,000
            images takes minutes on a CPU).

    Returns:
        ``{"n": N, "elbo": mean ELBO per image (nats, one z sample), "test_loss": -elbo}`` and, with
        ``iw_samples > 0``, ``"iw_samples"`` and ``"iw_log_likelihood"`` (the mean IWAE bound).
    """
    if isinstance(iw_samples, bool) or not isinstance(iw_samples, int) or iw_samples < 0:
        raise ValueError(f"iw_samples must be an integer >= 0, got {iw_samples!r}")
    device = model.fc1.weight.device
    x = _images(data, device)
    was_training = model.training
    model.eval()
    try:
        n = x.shape[0]
        loss = neg_elbo_sum(model, x, generator).item() / n
        result = {"n": n, "elbo": -loss, "test_loss": loss}
        if iw_samples:
            ll = iw_log_likelihood(model, x, iw_samples, generator, max_elements, progress)
            result.update(iw_samples=iw_samples, iw_log_likelihood=ll.mean().item())
    finally:
        model.train(was_training)
    return result
