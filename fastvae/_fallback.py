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


# Rows are processed in chunks of about this many elements, so the temporaries stay small and in
# cache instead of being freshly allocated (and page-faulted) at the size of the whole batch.
_CHUNK_ELEMENTS = 1 << 20


def _row_chunks(batch: int, width: int):
    """Row slices covering [0, batch), or ``[None]`` (all rows at once) for a small batch or when
    traced by torch.compile, which fuses the passes anyway."""
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    if batch <= step or torch.compiler.is_compiling():
        return [None]
    return [slice(i, min(i + step, batch)) for i in range(0, batch, step)]


def _take(t: Tensor, rows) -> Tensor:
    return t if rows is None else t[rows]


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
            rows = beta * _kl_rows(mu.to(dt), logvar.to(dt))
            for c in _row_chunks(*recon.shape):
                bce = _bce_rows(_take(recon, c).to(dt), _target(_take(x, c), dt), from_logits)
                if c is None:
                    rows = rows + bce
                else:
                    rows[c] += bce
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
        drecon = dx = dmu = dlogvar = None
        if ctx.needs_input_grad[0]:
            drecon = torch.empty(recon.shape, dtype=recon.dtype, device=recon.device)
        if ctx.needs_input_grad[1]:
            dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        for c in _row_chunks(*recon.shape) if (drecon is not None or dx is not None) else ():
            s = _take(recon, c).to(dt)
            gc = _take(g_rows, c) if reduction == "none" else g_rows
            if drecon is not None:
                t = _target(_take(x, c), dt)
                # on logits in full precision the result is written straight into the output
                direct = from_logits and drecon.dtype == dt
                if from_logits:
                    d = torch.sigmoid(s, out=_take(drecon, c)) if direct else torch.sigmoid(s)
                    d.sub_(t)
                else:
                    d = (s - t).div_((s * (1.0 - s)).clamp_(min=1e-12))
                d.mul_(gc)
                if not direct:
                    _take(drecon, c).copy_(d)
            if dx is not None:
                if from_logits:
                    d = (-s).mul_(gc)
                else:
                    d = (torch.log1p(-s).clamp_(min=-100.0) - torch.log(s).clamp_(min=-100.0)).mul_(gc)
                _take(dx, c).copy_(d)
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
    """z = mu + exp(logvar / 2) * eps, differentiated by autograd; computed in fp32 (fp64 for
    fp64) and rounded once to the output dtype, like the Triton kernel."""
    out = torch.promote_types(mu.dtype, logvar.dtype)
    dt = torch.float64 if out == torch.float64 else torch.float32
    if out == dt and eps.dtype == dt:
        return torch.addcmul(mu, torch.exp(0.5 * logvar), eps)
    return torch.addcmul(mu.to(dt), torch.exp(0.5 * logvar.to(dt)), eps.to(dt)).to(out)
