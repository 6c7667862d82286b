"""Evaluation: the test ELBO with one z sample, and the importance-weighted bound of log p(x).

The IWAE bound with K samples (Burda et al., 2016):
``log p(x) >= E[log (1/K) sum_k p(x, z_k) / q(z_k | x)]``, z_k ~ q(z | x), computed by
:func:`fastvae.iwae.iw_log_likelihood`: cache-sized chunks of samples and images, a running
log-sum-exp over the samples (memory independent of K), the x.l term once per image, and on CUDA
the fused output-layer + likelihood kernel (no logits in memory).
"""
from __future__ import annotations

import sys
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import iwae as _iwae
from .data import Dataset
from .functional import elbo_loss
from .model import VAE


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


def _world() -> tuple[int, int]:
    """(world size, rank) of an initialised torch.distributed group, else (1, 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _hidden_fn(model: VAE):
    """z -> relu(fc3(z)) for the evaluator's chunks, written into one buffer per thread and reused
    (on CPU a fresh [rows, H] tensor per chunk costs page faults: ~15% of the evaluation)."""
    if model.fc3.weight.device.type != "cpu":
        return lambda z: F.relu(model.fc3(z))
    import threading

    local = threading.local()
    w, b = model.fc3.weight, model.fc3.bias

    def hidden(z: Tensor) -> Tensor:
        buf = getattr(local, "buf", None)
        if buf is None or buf.shape[0] < z.shape[0] or buf.dtype != z.dtype:
            buf = local.buf = torch.empty(z.shape[0], w.shape[0], dtype=z.dtype)
        return torch.addmm(b, z, w.t(), out=buf[: z.shape[0]]).relu_()

    return hidden


@torch.no_grad()
def iw_log_likelihood(model: VAE, x: Tensor, iw_samples: int, generator: Optional[torch.Generator] = None,
                      max_elements: Optional[int] = None, progress: bool = False,
                      eps: Optional[Tensor] = None) -> Tensor:
    """Per-image IWAE estimate of log p(x) in nats with ``iw_samples`` samples: float64 [N].

    Streams over the samples with :func:`fastvae.iwae.iw_log_likelihood` (a running log-sum-exp;
    memory independent of K). ``max_elements`` caps the decoder outputs per chunk (default: a
    cache-sized chunk); ``eps`` [K, N, L] fixes the noise (tests); ``progress`` shows a bar over
    the images on stderr.

    Under torch.distributed (e.g. ``torchrun``; every rank must call it with the same x) the images
    are sharded over the ranks (``tensor_split``) and the full [N] result is gathered on every
    rank. Each rank then draws its noise from a generator seeded by one draw of ``generator`` (or
    of torch's default generator) plus its rank, so the shards' samples are independent.
    """
    if isinstance(iw_samples, bool) or not isinstance(iw_samples, int) or iw_samples < 1:
        raise ValueError(f"iw_samples must be an integer >= 1, got {iw_samples!r}")
    d = model.input_dim
    xs = model.prepare_input(x)
    world, rank = _world()
    n = xs.shape[0]
    if world > 1:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=xs.device).item())
        generator = torch.Generator(device=xs.device).manual_seed(seed + rank)
        xs = xs.tensor_split(world)[rank]
        if eps is not None:
            eps = eps.tensor_split(world, dim=1)[rank]
    chunk_rows = None if max_elements is None else max(1, max_elements // d)
    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc=f"IWAE bound, K={iw_samples}", unit="image", disable=not progress or rank != 0,
               leave=True, dynamic_ncols=True, file=sys.stderr)
    try:
        if xs.shape[0]:
            mu, logvar = torch.cat([torch.stack(model.encode(xc)) for xc in xs.split(4096)], 1).unbind(0)
            out = _iwae.iw_log_likelihood(
                xs, mu, logvar, _hidden_fn(model), model.fc4.weight, model.fc4.bias,
                num_samples=iw_samples, eps=eps, generator=generator, chunk_rows=chunk_rows,
                progress=lambda k: bar.update(k * world), backend=model.backend)
        else:  # more ranks than images
            out = torch.empty(0, dtype=torch.float64, device=xs.device)
    finally:
        bar.close()
    if world == 1:
        return out
    import torch.distributed as dist

    sizes = [t.shape[0] for t in torch.empty(n).tensor_split(world)]
    padded = torch.zeros(sizes[0], dtype=torch.float64, device=out.device)   # sizes[0] is the largest
    padded[: out.shape[0]] = out
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:k] for p, k in zip(parts, sizes)])


@torch.no_grad()
def evaluate(model: VAE, data: Union[Tensor, Dataset], iw_samples: int = 0,
             generator: Optional[torch.Generator] = None, max_elements: Optional[int] = None,
             progress: bool = False) -> dict:
    """Test-set figures of a trained VAE.

    Args:
        model: a :class:`fastvae.VAE`.
        data: a :class:`fastvae.data.Dataset` (its test split is used) or images [N, ...].
        iw_samples: K for the importance-weighted bound of log p(x); 0 skips it. Memory does not
            grow with K (chunks of at most ``max_elements`` decoder outputs; default cache-sized).
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
