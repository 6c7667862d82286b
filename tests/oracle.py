"""Float64 reference for the ELBO and the reparameterisation trick, written from the formulas,
independently of fastvae's fallback. It always computes on the CPU: whatever device the inputs
(and grad_output) are on, the reference tensors it returns are CPU float64 tensors.

``terms(...)`` gives the float64 leaves and the reduced terms (loss, reconstruction, kl, kl_eff), so a
test can differentiate any combination of them; ``elbo(...)`` is the loss and its gradients for a
grad_output.
"""
import math

import torch
import torch.nn.functional as F

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
# torch.distributions.ContinuousBernoulli clamps its probabilities (sigmoid(s) rounds towards 1 in
# float64 beyond |s| ~ 30, and 1 - p loses digits well before): beyond this the oracle uses the
# closed form log C(s) = log(s / tanh(s / 2)), exact in float64 away from s = 0
CB_DISTRIBUTION_UP_TO = 15.0


def as_float64_target(x):
    x = x.detach().cpu()
    return x.double() / 255.0 if x.dtype == torch.uint8 else x.double()


def _bernoulli_logits(s, t):
    # log(1 + e^s) - t*s, in the overflow-free form
    return s.clamp(min=0) - s * t + torch.log1p(torch.exp(-s.abs()))


def _bernoulli_probs(p, t):
    # F.binary_cross_entropy's definition: logs clamped at -100. Its derivative in p is undefined
    # where p is exactly 0 or 1; PyTorch defines it as (p - t) / max(p (1 - p), 1e-12): the value
    # and d/dt come from the formula, d/dp from PyTorch's own float64 kernel
    logp = torch.log(p.detach()).clamp(min=-100)
    log1mp = torch.log1p(-p.detach()).clamp(min=-100)
    value = -(t * logp + (1 - t) * log1mp)
    bce = F.binary_cross_entropy(p, t.detach(), reduction="none")
    return value + (bce - bce.detach())


def cb_log_norm_closed(s):
    """log C(s) = log(s / tanh(s / 2)) in float64 (not at s = 0)."""
    return torch.log(s / torch.tanh(s / 2))


def _continuous_bernoulli(s, t):
    far = s.abs() > CB_DISTRIBUTION_UP_TO
    s_near = torch.where(far, torch.zeros_like(s), s)
    s_far = torch.where(far, s, torch.full_like(s, 2 * CB_DISTRIBUTION_UP_TO))
    near = -torch.distributions.ContinuousBernoulli(logits=s_near, validate_args=False).log_prob(t)
    closed = _bernoulli_logits(s_far, t) - cb_log_norm_closed(s_far)
    return torch.where(far, closed, near)


def _leaf(t, grad=True):
    return t.detach().cpu().double().requires_grad_(grad and t.is_floating_point())


def terms(recon, x, mu, logvar, *, reduction="sum", beta=1.0, likelihood="bernoulli", sigma=None,
          free_bits=0.0, from_logits=True):
    """(leaves, terms): float64 leaves {recon, x, mu, logvar[, sigma][, beta]} in the inputs'
    shapes (x only when floating, sigma and beta only when tensors), and the reduced float64 terms
    {loss, reconstruction, kl, kl_eff}, differentiable w.r.t. the leaves."""
    B = recon.shape[0]
    leaves = {"recon": _leaf(recon), "mu": _leaf(mu), "logvar": _leaf(logvar)}
    if x.is_floating_point():
        leaves["x"] = _leaf(x)
        t = leaves["x"].reshape(B, -1)
    else:
        t = as_float64_target(x).reshape(B, -1)
    s = leaves["recon"].reshape(B, -1)
    if likelihood == "bernoulli":
        nll = _bernoulli_logits(s, t) if from_logits else _bernoulli_probs(s, t)
    elif likelihood == "mse":
        nll = (s - t) ** 2
    elif likelihood == "gaussian":
        if isinstance(sigma, torch.Tensor):
            leaves["sigma"] = _leaf(sigma)
            sig = leaves["sigma"].expand(recon.shape).reshape(B, -1)
            log_sig = torch.log(sig)
        else:
            sig = 1.0 if sigma is None else float(sigma)
            log_sig = math.log(sig)
        nll = 0.5 * ((s - t) / sig) ** 2 + log_sig + LOG_SQRT_2PI
    elif likelihood == "continuous_bernoulli":
        nll = _continuous_bernoulli(s, t)
    else:
        raise ValueError(likelihood)
    m, v = leaves["mu"], leaves["logvar"]
    kl_el = 0.5 * (m * m + torch.exp(v) - 1 - v)
    if free_bits > 0:
        active = kl_el.detach().mean(0) > free_bits
        kl_eff_el = torch.where(active, kl_el, torch.full_like(kl_el, free_bits))
    else:
        kl_eff_el = kl_el
    if isinstance(beta, torch.Tensor):
        leaves["beta"] = _leaf(beta)
        b = leaves["beta"]
    else:
        b = beta
    rows = {"reconstruction": nll.sum(1), "kl": kl_el.sum(1), "kl_eff": kl_eff_el.sum(1)}
    rows["loss"] = rows["reconstruction"] + b * rows["kl_eff"]
    reduce = {"sum": lambda r: r.sum(), "batchmean": lambda r: r.sum() / B, "none": lambda r: r}[reduction]
    return leaves, {k: reduce(r) for k, r in rows.items()}


def grads(objective, leaves):
    """{name: d objective / d leaf} for every leaf (zeros where it does not depend on it)."""
    names = list(leaves)
    got = torch.autograd.grad(objective, [leaves[n] for n in names], allow_unused=True, retain_graph=True)
    return {n: (torch.zeros_like(leaves[n]) if g is None else g) for n, g in zip(names, got)}


def elbo(recon, x, mu, logvar, *, reduction="sum", beta=1.0, from_logits=True, grad_output=None,
         likelihood="bernoulli", sigma=None, free_bits=0.0):
    """(loss, {name: grad}) in float64 for the inputs as they are (after any rounding to low
    precision). Gradients are d(loss . grad_output)/d input ("x" whenever x is floating)."""
    leaves, t = terms(recon, x, mu, logvar, reduction=reduction, beta=beta, likelihood=likelihood,
                      sigma=sigma, free_bits=free_bits, from_logits=from_logits)
    loss = t["loss"]
    g = torch.ones_like(loss) if grad_output is None else grad_output.detach().cpu().double().reshape(loss.shape)
    return loss.detach(), grads((loss * g).sum(), leaves)


def reparameterize(mu, logvar, eps, grad_output):
    m, v, e = (_leaf(t) for t in (mu, logvar, eps))
    z = m + torch.exp(0.5 * v) * e
    grads = torch.autograd.grad(z, [m, v, e], grad_output.detach().cpu().double())
    return z.detach(), dict(zip(("mu", "logvar", "eps"), grads))
