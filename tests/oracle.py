"""Float64 reference for the ELBO and the reparameterisation trick, written from the formulas,
independently of fastvae's fallback."""
import torch
import torch.nn.functional as F


def as_float64_target(x):
    x = x.detach()
    return x.double() / 255.0 if x.dtype == torch.uint8 else x.double()


def elbo(recon, x, mu, logvar, *, reduction="sum", beta=1.0, from_logits=True, grad_output=None):
    """(loss, {name: grad}) in float64 for the inputs as they are (after any rounding to low
    precision). Gradients are d(loss . grad_output)/d input."""
    B = recon.shape[0]
    r = recon.detach().double().reshape(B, -1).requires_grad_()
    t = as_float64_target(x).reshape(B, -1).requires_grad_(x.is_floating_point())
    m = mu.detach().double().requires_grad_()
    v = logvar.detach().double().requires_grad_()
    if from_logits:
        # log(1 + e^s) - t*s, in the overflow-free form
        bce = (r.clamp(min=0) - r * t + torch.log1p(torch.exp(-r.abs()))).sum(1)
    else:
        # F.binary_cross_entropy's definition: logs clamped at -100
        logp = torch.log(r).clamp(min=-100)
        log1mp = torch.log1p(-r).clamp(min=-100)
        bce = -(t * logp + (1 - t) * log1mp).sum(1)
    kl = 0.5 * (m * m + torch.exp(v) - 1 - v).sum(1)
    rows = bce + beta * kl
    loss = {"sum": rows.sum(), "mean": rows.mean(), "none": rows}[reduction]
    g = torch.ones_like(loss) if grad_output is None else grad_output.detach().double()
    inputs = [r, m, v] + ([t] if t.requires_grad else [])
    grads = torch.autograd.grad(loss, inputs, g, allow_unused=True)
    out = {"recon": grads[0].reshape(recon.shape), "mu": grads[1], "logvar": grads[2]}
    if t.requires_grad:
        out["x"] = grads[3].reshape(x.shape)
    if not from_logits:
        # d/dp of the clamped logs is undefined where p is exactly 0 or 1; F.binary_cross_entropy
        # defines it as (p - t) / max(p (1 - p), 1e-12): take PyTorch's own float64 kernel
        p = recon.detach().double().reshape(B, -1).requires_grad_()
        per = F.binary_cross_entropy(p, t.detach(), reduction="none").sum(1)
        per = {"sum": per.sum(), "mean": per.mean(), "none": per}[reduction]
        (dp,) = torch.autograd.grad(per, [p], g)
        out["recon"] = dp.reshape(recon.shape)
    return loss.detach(), out


def reparameterize(mu, logvar, eps, grad_output):
    m = mu.detach().double().requires_grad_()
    v = logvar.detach().double().requires_grad_()
    e = eps.detach().double().requires_grad_()
    z = m + torch.exp(0.5 * v) * e
    grads = torch.autograd.grad(z, [m, v, e], grad_output.detach().double())
    return z.detach(), dict(zip(("mu", "logvar", "eps"), grads))
