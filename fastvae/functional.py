"""fastvae's functional API, shaped like ``torch.nn.functional``."""
from __future__ import annotations

import math
import sys
import warnings
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import _backend, _fallback

REDUCTIONS = ("sum", "batchmean", "none")
LIKELIHOODS = ("bernoulli", "gaussian", "mse", "continuous_bernoulli")
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class ELBOComponents(NamedTuple):
    """``elbo_loss(..., return_components=True)``: the loss and its two terms, each reduced like the
    loss and differentiable. ``loss = reconstruction + beta * kl`` (with ``free_bits`` the loss
    uses the floored KL, while ``kl`` stays the true KL, the figure to log)."""
    loss: Tensor
    reconstruction: Tensor
    kl: Tensor


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


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_reduction(reduction: str) -> str:
    """``reduction`` if it is one of REDUCTIONS, else a ValueError ("mean" says what to use)."""
    if reduction == "mean":
        raise ValueError(
            "reduction='mean' is ambiguous for a VAE loss: use 'batchmean' for the mean over the batch "
            "of the per-sample sums (the papers', pythae's and fastvae <= 0.1's 'mean'); for torch's "
            "per-element mean of the reconstruction term (F.mse_loss's default) divide a "
            "'batchmean' loss by the number of elements per sample (README, Porting your loss)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_likelihood(likelihood: str) -> str:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    return likelihood


def _check_elbo_inputs(recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> None:
    for name, t in (("recon", recon), ("x", x), ("mu", mu), ("logvar", logvar)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check_float("recon", recon)
    _check_float("mu", mu)
    _check_float("logvar", logvar)
    if not (x.is_floating_point() or x.dtype == torch.uint8):
        raise TypeError(f"x must be floating point, or uint8 pixel intensities read as x/255; got {x.dtype}")
    def shapes():
        return (f"recon {tuple(recon.shape)}, x {tuple(x.shape)}, mu {tuple(mu.shape)}, "
                f"logvar {tuple(logvar.shape)}")
    if recon.dim() < 1 or x.dim() < 1 or recon.shape[0] != x.shape[0] or recon.numel() != x.numel():
        raise ValueError("recon and x must be [B, ...] with the same batch size and number of "
                         f"elements; got {shapes()}")
    if mu.dim() != 2 or mu.shape != logvar.shape or mu.shape[0] != recon.shape[0]:
        raise ValueError(f"mu and logvar must both be [B, L] with the batch size of recon; got {shapes()}")
    if recon.numel() == 0 or mu.numel() == 0:
        raise ValueError(f"elbo_loss needs a non-empty batch; got {shapes()}")
    device = recon.device
    if x.device != device or mu.device != device or logvar.device != device:
        devices = {t.device for t in (recon, x, mu, logvar)}
        raise ValueError(f"recon, x, mu and logvar must be on one device; got {sorted(map(str, devices))}")
    if x.requires_grad and not recon.requires_grad:
        # costs no sync: the classic slip of calling loss(x, recon, ...) trains the wrong objective
        warnings.warn("elbo_loss: x requires grad but recon does not. The arguments are "
                      "(recon, x, mu, logvar): were recon and x swapped?", stacklevel=3)


def _sigma_args(likelihood: str, sigma, recon: Tensor) -> tuple[Optional[Tensor], float, float]:
    """(sigma as a [B, N] view or None, inv_sigma, log_norm) for the kernels: the Gaussian's
    1 / sigma and log sigma + log(2 pi) / 2 when sigma is a number."""
    if likelihood == "mse":
        if sigma is not None:
            raise ValueError("sigma does not apply to likelihood='mse' (the squared error, a Gaussian "
                             "with sigma^2 = 1/2 without its constant); use likelihood='gaussian'")
        return None, math.sqrt(2.0), 0.0
    if likelihood != "gaussian":
        if sigma is not None:
            raise ValueError(f"sigma applies to likelihood='gaussian' only, not {likelihood!r}")
        return None, 1.0, 0.0
    if sigma is None:
        sigma = 1.0
    if isinstance(sigma, Tensor):
        _check_float("sigma", sigma)
        if sigma.device != recon.device:
            raise ValueError(f"sigma must be on recon's device {recon.device}, got {sigma.device}")
        try:
            ok = torch.broadcast_shapes(sigma.shape, recon.shape) == recon.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"sigma {tuple(sigma.shape)} must broadcast to recon {tuple(recon.shape)}: "
                             "a scalar, per pixel (recon.shape[1:]), or per sample ([B, 1, ...])")
        return _rows(sigma.expand(recon.shape), recon.shape[0]), 1.0, 0.0
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (0 < sigma < math.inf):
        raise ValueError(f"sigma must be a positive finite number or a tensor, got {sigma!r}")
    return None, 1.0 / sigma, math.log(sigma) + _LOG_SQRT_2PI


def check_free_bits(free_bits) -> None:
    if isinstance(free_bits, bool) or not isinstance(free_bits, (int, float)) or not (0 <= free_bits < math.inf):
        raise ValueError(f"free_bits must be a finite number >= 0 (nats per latent dimension), got {free_bits!r}")


def _beta_args(beta) -> tuple[float, Optional[Tensor]]:
    """(the kernels' float beta, the tensor beta applied outside them, or None)."""
    if isinstance(beta, Tensor):
        if beta.dim() != 0 or not beta.is_floating_point():
            raise ValueError(f"beta must be a number or a 0-dim floating-point tensor, got "
                             f"{beta.dtype} of shape {tuple(beta.shape)}")
        # a CPU beta's value is read for free and checked as a number's; a CUDA beta is not (reading
        # it would make the host wait for the device)
        if (beta.device.type == "cpu" and not torch.compiler.is_compiling()
                and not bool(torch.isfinite(beta.detach()) & (beta.detach() >= 0))):
            raise ValueError(f"beta must be finite and >= 0, got a tensor holding {beta.item()!r}")
        return 0.0, beta
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0 or a 0-dim tensor, got {beta!r}")
    return float(beta), None


def elbo_loss(recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, *, reduction: str = "sum",
              beta: Union[float, Tensor] = 1.0, likelihood: str = "bernoulli",
              sigma: Union[float, Tensor, None] = None, free_bits: float = 0.0,
              from_logits: bool = True, return_components: bool = False,
              backend: str = "auto") -> Union[Tensor, ELBOComponents]:
    """The negative ELBO of a VAE with a Gaussian encoder: reconstruction NLL + beta * KL.

    Per sample i: ``loss_i = sum_j nll(recon_ij, x_ij) + beta * KL_i`` with the NLL summed over all
    non-batch dimensions and ``KL_i = 0.5 * sum_k (mu_ik^2 + exp(logvar_ik) - 1 - logvar_ik)``.

    Args:
        recon: [B, ...] decoder outputs: logits (Bernoulli with ``from_logits=True``, continuous
            Bernoulli), probabilities (Bernoulli with ``from_logits=False``) or means (Gaussian, mse).
        x: targets with recon's batch size and number of elements (e.g. [B, 1, 28, 28] for a
            [B, 784] recon): floats, or uint8 pixel intensities read as x/255.
        mu, logvar: [B, L] encoder outputs.
        reduction: "sum" over the batch (the paper's and PyTorch's VAE example's convention),
            "batchmean" (the mean over the batch of the per-sample sums), or "none" ([B]).
            "mean" is refused as ambiguous (the error says what to use).
        beta: weight of the KL term: a number, or a 0-dim tensor (annealing schedules; it gets its
            gradient if it requires one).
        likelihood: "bernoulli" (BCE, the default), "gaussian" (``-Normal(recon, sigma).log_prob(x)``,
            constant included), "mse" (squared error ``(recon - x)^2``: a Gaussian with
            sigma^2 = 1/2 without its constant, pythae's and AntixK's "mse"), or
            "continuous_bernoulli" (recon are logits; Loaiza-Ganem & Cunningham, 2019).
        sigma: the Gaussian's standard deviation: a number (default 1), or a tensor broadcastable
            to recon (per pixel, per sample [B, 1], learned as in sigma-VAE; it gets its gradient).
        free_bits: lambda >= 0 (Kingma et al., 2016): in the loss, the KL of each latent dimension
            averaged over the batch is floored at lambda nats (a dimension below it contributes
            lambda per sample and no gradient).
        from_logits: Bernoulli only: recon holds logits (stable, no sigmoid materialised), or
            probabilities with the semantics of ``F.binary_cross_entropy`` (logs clamped at -100;
            a probability outside [0, 1] or NaN gives a NaN loss).
        return_components: return ``ELBOComponents(loss, reconstruction, kl)``, computed in the
            same pass.
        backend: "auto", "triton" or "torch"; see the README.

    Returns:
        The loss (float32; float64 for float64 inputs) or ELBOComponents. Gradients flow to recon,
        mu, logvar and, where they require grad, x, sigma and beta.
    """
    if torch._C._functorch.maybe_current_level() is not None:
        raise RuntimeError("fastvae.elbo_loss does not support torch.func transforms (grad, vmap, "
                           "jacrev, ...): call it outside them, e.g. with torch.autograd.grad")
    check_reduction(reduction)
    check_likelihood(likelihood)
    _check_bool("from_logits", from_logits)
    _check_bool("return_components", return_components)
    if likelihood != "bernoulli" and not from_logits:
        raise ValueError(f"from_logits=False applies to likelihood='bernoulli' only, not {likelihood!r}")
    check_free_bits(free_bits)
    _check_elbo_inputs(recon, x, mu, logvar)
    sig, inv_sigma, log_norm = _sigma_args(likelihood, sigma, recon)
    kbeta, beta_t = _beta_args(beta)
    if beta_t is not None and beta_t.device != recon.device and beta_t.device.type != "cpu":
        raise ValueError(f"beta must be on recon's device {recon.device} (or a CPU scalar), got {beta_t.device}")
    lik = "gaussian" if likelihood == "mse" else likelihood
    batch = recon.shape[0]
    r2, x2 = _rows(recon, batch), _rows(x, batch)
    # the loss alone where the caller wants nothing else (one output tensor instead of four)
    terms = return_components or beta_t is not None
    tensors = (recon, x, mu, logvar) if sig is None else (recon, x, mu, logvar, sig)
    if _backend.resolve(backend, *tensors) == "triton":
        # single pass: the gradients are written with the loss whenever autograd will ask for them
        grad = torch.is_grad_enabled() and (recon.requires_grad or x.requires_grad or mu.requires_grad
                                            or logvar.requires_grad or (sig is not None and sig.requires_grad))
        _triton_ops = sys.modules[_backend.TRITON_OPS]  # imported by resolve()
        cfg = _triton_ops.ELBOConfig(
            likelihood=lik, from_logits=from_logits, reduction=reduction, inv_sigma=inv_sigma,
            log_norm=log_norm, beta=kbeta, free_bits=float(free_bits), grad=grad,
            x_grad=grad and x.requires_grad, sigma_grad=grad and sig is not None and sig.requires_grad,
            terms=terms)
        out = _triton_ops.elbo_apply(r2, x2, mu, logvar, sig, cfg)
        out = out if terms or reduction == "none" else (out,)
    else:
        out = _fallback.elbo(r2, x2, mu, logvar, sig, inv_sigma, log_norm, kbeta, float(free_bits), lik,
                             from_logits, reduction, terms=terms)
    loss = out[0] if beta_t is None else out[1] + beta_t.to(device=out[1].device, dtype=out[1].dtype) * out[3]
    if return_components:
        return ELBOComponents(loss, out[1], out[2])
    return loss


def _draw_seed(device: torch.device, generator: Optional[torch.Generator]) -> Tensor:
    # one int64 on the device, drawn from torch's RNG: fresh on each call and on each graph replay
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64, generator=generator)


def check_count(name: str, value, optional: bool = False) -> Optional[int]:
    """``value`` if it is an int >= 1 (bools refused; None too when ``optional``), else a TypeError
    (not an int) or a ValueError (< 1) naming ``name``."""
    if optional and value is None:
        return None
    what = "None or an integer >= 1" if optional else "an integer >= 1"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be {what}, got {value}")
    return value


def check_num_samples(num_samples) -> None:
    """A TypeError unless ``num_samples`` is None or an int (bools refused), a ValueError if < 1."""
    check_count("num_samples", num_samples, optional=True)


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

    mu and logvar broadcast against each other, as in ``torch.distributions.Normal``: a logvar of
    shape [L] (learned, shared by the batch) with mu [B, L] gives z [B, L], and logvar gets the
    gradient summed over the batch. "mu's shape" above then means the broadcast shape.
    """
    for name, t in (("mu", mu), ("logvar", logvar)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        _check_float(name, t)
    check_num_samples(num_samples)
    if mu.device != logvar.device:
        raise ValueError(f"mu and logvar must be on one device; got {mu.device} and {logvar.device}")
    if mu.shape != logvar.shape:  # e.g. a learned logvar [L] shared by the batch
        try:
            both = torch.broadcast_shapes(mu.shape, logvar.shape)
        except RuntimeError:
            raise ValueError(f"mu and logvar must have the same shape or broadcast to one; got mu "
                             f"{tuple(mu.shape)}, logvar {tuple(logvar.shape)}") from None
        # expanded views (stride 0, no copy): autograd sums the gradients back to each shape
        mu, logvar = mu.expand(both), logvar.expand(both)
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
    if torch._C._functorch.maybe_current_level() is not None:
        raise RuntimeError("fastvae.reparameterize's Triton kernels do not support torch.func "
                           "transforms (grad, vmap, jacrev, ...): use backend='torch' inside them, "
                           "or call it outside them")
    # the kernels take [M, L]; a tensor already of that form goes as it is (each view would add a
    # node to the autograd graph, and the backward's engine time with it)
    width = mu.shape[-1] if mu.dim() else 1
    if mu.dim() != 2:
        mu, logvar = mu.reshape(-1, width), logvar.reshape(-1, width)
    if eps is not None and eps.dim() != 2:
        eps = eps.reshape(-1, width)
    seed = _draw_seed(mu.device, generator) if eps is None else None
    z = sys.modules[_backend.TRITON_OPS].reparameterize_apply(  # imported by resolve()
        mu, logvar, eps, seed, 0 if num_samples is None else num_samples)
    return z if z.shape == shape else z.view(shape)
