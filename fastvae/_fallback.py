"""The pure-PyTorch implementation of fastvae's ops (CPU, float64, and wherever Triton is absent).

Numerically stable and written for speed on CPU: each op is a ``torch.autograd.Function`` with a
closed-form backward, so autograd keeps no intermediate graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _target(x: Tensor, dtype: torch.dtype) -> Tensor:
    if x.dtype == torch.uint8:
        return x.to(dtype).div_(255.0)
    return x.to(dtype)


def _bce_rows(s: Tensor, t: Tensor, from_logits: bool) -> Tensor:
    """Per-row sum of BCE for 2-D ``s`` (logits or probabilities) and targets ``t``."""
    if from_logits:
        # softplus(s) - s*t; the row dot product runs as one batched BLAS call, no temporary
        dot = torch.bmm(s.unsqueeze(1), t.unsqueeze(2)).view(-1)
        return F.softplus(s).sum(1) - dot
    return F.binary_cross_entropy(s, t, reduction="none").sum(1)


def _kl_rows(mu: Tensor, logvar: Tensor) -> Tensor:
    return 0.5 * (mu * mu + logvar.exp() - 1.0 - logvar).sum(1)


def _reduce(rows: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.mean()
    return rows


class ELBOFunction(torch.autograd.Function):
    """loss = sum_j bce(recon_ij, x_ij) + beta * KL_i, reduced over the batch; 2-D inputs."""

    @staticmethod
    def forward(ctx, recon, x, mu, logvar, beta: float, from_logits: bool, reduction: str):
        dt = _compute_dtype(recon)
        # autocast-safe: the loss is always computed in fp32 (or fp64), whatever autocast is on
        with torch.autocast(recon.device.type, enabled=False):
            s = recon.to(dt)
            t = _target(x, dt)
            rows = _bce_rows(s, t, from_logits) + beta * _kl_rows(mu.to(dt), logvar.to(dt))
        ctx.save_for_backward(recon, x, mu, logvar)
        ctx.args = (beta, from_logits, reduction)
        return _reduce(rows, reduction)

    @staticmethod
    def backward(ctx, grad):
        recon, x, mu, logvar = ctx.saved_tensors
        beta, from_logits, reduction = ctx.args
        dt = _compute_dtype(recon)
        B = recon.shape[0]
        g = grad.to(dt)
        if reduction == "mean":
            g = g / B
        g_rows = g.reshape(-1, 1) if reduction == "none" else g
        s = recon.to(dt)
        t = _target(x, dt)
        drecon = dx = dmu = dlogvar = None
        if ctx.needs_input_grad[0]:
            if from_logits:
                d = torch.sigmoid(s).sub_(t)
            else:
                d = (s - t).div_((s * (1.0 - s)).clamp_(min=1e-12))
            drecon = d.mul_(g_rows).to(recon.dtype)
        if ctx.needs_input_grad[1]:
            if from_logits:
                dx = (-s).mul_(g_rows)
            else:
                dx = (torch.log1p(-s).clamp_(min=-100.0) - torch.log(s).clamp_(min=-100.0)).mul_(g_rows)
            dx = dx.to(x.dtype)
        gb = g_rows * beta
        if ctx.needs_input_grad[2]:
            dmu = (mu.to(dt) * gb).to(mu.dtype)
        if ctx.needs_input_grad[3]:
            dlogvar = ((logvar.to(dt).exp() - 1.0) * (0.5 * gb)).to(logvar.dtype)
        return drecon, dx, dmu, dlogvar, None, None, None


def elbo(recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, beta: float, from_logits: bool,
         reduction: str) -> Tensor:
    return ELBOFunction.apply(recon, x, mu, logvar, beta, from_logits, reduction)


def reparameterize(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
    """z = mu + exp(logvar / 2) * eps, differentiated by autograd."""
    return torch.addcmul(mu, torch.exp(0.5 * logvar), eps)
