"""fastvae's functional API, shaped like ``torch.nn.functional``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _backend, _fallback

REDUCTIONS = ("sum", "mean", "none")


def _rows(t: Tensor, batch: int) -> Tensor:
    """``t`` [B, ...] as [B, N]: a view whenever the strides allow one, else a copy."""
    if t.dim() == 2:
        return t
    try:
        return t.view(batch, -1)
    except RuntimeError:
        return t.reshape(batch, -1)


def _check_float(name: str, t: Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_reduction(reduction: str) -> str:
    """``reduction`` if it is one of REDUCTIONS, else a ValueError."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def _check_elbo_inputs(recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, reduction: str) -> None:
    check_reduction(reduction)
    for name, t in (("recon", recon), ("x", x), ("mu", mu), ("logvar", logvar)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check_float("recon", recon)
    _check_float("mu", mu)
    _check_float("logvar", logvar)
    if not (x.is_floating_point() or x.dtype == torch.uint8):
        raise TypeError(f"x must be floating point, or uint8 pixel intensities read as x/255; got {x.dtype}")
    shapes = (f"recon {tuple(recon.shape)}, x {tuple(x.shape)}, mu {tuple(mu.shape)}, "
              f"logvar {tuple(logvar.shape)}")
    if recon.dim() < 1 or x.dim() < 1 or recon.shape[0] != x.shape[0] or recon.numel() != x.numel():
        raise ValueError("recon and x must be [B, ...] with the same batch size and number of "
                         f"elements; got {shapes}")
    if mu.dim() != 2 or mu.shape != logvar.shape or mu.shape[0] != recon.shape[0]:
        raise ValueError(f"mu and logvar must both be [B, L] with the batch size of recon; got {shapes}")
    if recon.shape[0] == 0 or recon.numel() == 0 or mu.numel() == 0:
        raise ValueError(f"elbo_loss needs a non-empty batch; got {shapes}")
    devices = {t.device for t in (recon, x, mu, logvar)}
    if len(devices) > 1:
        raise ValueError(f"recon, x, mu and logvar must be on one device; got {sorted(map(str, devices))}")


def elbo_loss(recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, *, reduction: str = "sum",
              beta: float = 1.0, from_logits: bool = True, backend: str = "auto") -> Tensor:
    """The negative ELBO of a Bernoulli-decoder, Gaussian-encoder VAE.

    Per sample i: ``BCE_i + beta * KL_i`` with ``BCE_i`` the binary cross-entropy summed over all
    non-batch dimensions and ``KL_i = 0.5 * sum(mu^2 + exp(logvar) - 1 - logvar)``.

    Args:
        recon: [B, ...] decoder logits (``from_logits=True``) or probabilities.
        x: targets with recon's batch size and number of elements (e.g. [B, 1, 28, 28] for a
            [B, 784] recon): floats in [0, 1], or uint8 pixel intensities read as x/255.
        mu, logvar: [B, L] encoder outputs.
        reduction: "sum" over the batch (the paper's convention), "mean", or "none" ([B]).
        beta: weight of the KL term.
        from_logits: recon holds logits (stable, no sigmoid materialised); with False it holds
            probabilities with the semantics of ``F.binary_cross_entropy`` (logs clamped at -100).
        backend: "auto", "triton" or "torch"; see ``fastvae`` docs.

    Returns:
        float32 loss (float64 for float64 inputs); gradients flow to recon, mu, logvar and, if it
        requires grad, x, each in its input's dtype.
    """
    _check_elbo_inputs(recon, x, mu, logvar, reduction)
    batch = recon.shape[0]
    r2, x2 = _rows(recon, batch), _rows(x, batch)
    if _backend.resolve(backend, recon, x, mu, logvar) == "triton":
        # single pass: the gradients are written with the loss whenever autograd will ask for them
        x_grad = x.requires_grad
        grad = torch.is_grad_enabled() and (x_grad or recon.requires_grad or mu.requires_grad
                                            or logvar.requires_grad)
        return torch.ops.fastvae.elbo(r2, x2, mu, logvar, float(beta), bool(from_logits), reduction,
                                      grad, grad and x_grad)[0]
    return _fallback.elbo(r2, x2, mu, logvar, float(beta), bool(from_logits), reduction)


def _draw_seed(device: torch.device, generator: Optional[torch.Generator]) -> Tensor:
    # one int64 on the device, drawn from torch's RNG: fresh on each call and on each graph replay
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64, generator=generator)


def check_num_samples(num_samples) -> None:
    """A TypeError unless ``num_samples`` is None or an int (bools refused), a ValueError if < 1."""
    if num_samples is None:
        return
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise TypeError(f"num_samples must be None or an integer >= 1, got {num_samples!r} "
                        f"({type(num_samples).__name__})")
    if num_samples < 1:
        raise ValueError(f"num_samples must be None or an integer >= 1, got {num_samples}")


def reparameterize(mu: Tensor, logvar: Tensor, *, num_samples: Optional[int] = None,
                   eps: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                   backend: str = "auto") -> Tensor:
    """The reparameterisation trick: ``z = mu + exp(logvar / 2) * eps``.

    With ``eps=None``, eps ~ N(0, 1) is drawn inside the Triton kernel (Philox) and never stored;
    its seed comes from ``generator``, else the default generator of mu's device, so
    ``torch.manual_seed`` makes runs reproducible and each call draws fresh noise. Gradients:
    ``d mu = g``, ``d logvar = g * eps * exp(logvar / 2) / 2``.

    ``num_samples=K`` draws K samples per input for importance-weighted objectives: z has shape
    ``[K, *mu.shape]`` with ``z[k] = mu + exp(logvar / 2) * eps[k]`` (``eps``, if given, is
    ``[K, *mu.shape]``); the gradients of mu and logvar sum over the K samples, in a fixed order
    (deterministic). ``num_samples=None`` (the default) gives z of mu's shape; ``num_samples=1``
    gives the same values with a leading dimension of 1 (the same draw from the same seed).
    """
    for name, t in (("mu", mu), ("logvar", logvar)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        _check_float(name, t)
    check_num_samples(num_samples)
    if mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar must have the same shape; got mu {tuple(mu.shape)}, "
                         f"logvar {tuple(logvar.shape)}")
    if mu.device != logvar.device:
        raise ValueError(f"mu and logvar must be on one device; got {mu.device} and {logvar.device}")
    shape = mu.shape if num_samples is None else torch.Size((num_samples, *mu.shape))
    if eps is not None:
        if not isinstance(eps, Tensor):
            raise TypeError(f"eps must be a torch.Tensor or None, got {type(eps).__name__}")
        _check_float("eps", eps)
        if eps.shape != shape or eps.device != mu.device:
            want = "mu's shape" if num_samples is None else f"shape [num_samples, *mu.shape] = {tuple(shape)}"
            raise ValueError(f"eps must have {want} and mu's device; got eps {tuple(eps.shape)} on "
                             f"{eps.device}, mu {tuple(mu.shape)} on {mu.device}")
    tensors = (mu, logvar) if eps is None else (mu, logvar, eps)
    if _backend.resolve(backend, *tensors) == "torch" or mu.numel() == 0:
        if eps is None:
            eps = torch.randn(shape, device=mu.device, dtype=torch.promote_types(mu.dtype, logvar.dtype),
                              generator=generator)
        return _fallback.reparameterize(mu, logvar, eps)
    width = mu.shape[-1] if mu.dim() else 1
    m2, v2 = mu.reshape(-1, width), logvar.reshape(-1, width)
    e2 = None if eps is None else eps.reshape(-1, width)
    seed = _draw_seed(mu.device, generator) if eps is None else None
    z = torch.ops.fastvae.reparameterize(m2, v2, e2, seed, 0 if num_samples is None else num_samples)
    return z.view(shape)
