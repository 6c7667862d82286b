"""README, "Porting your loss": each public convention, written from its formulas, against the
one- or two-line fastvae replacement the README gives, on every backend: equal values (loss and
logged components) and gradients, and equal training trajectories from the same start.

The three conventions (as found in public VAE code):
* pytorch/examples' vae (and Jackson-Kang/Pytorch-VAE-tutorial, which calls its loss with
  (x, x_hat, ...)): BCE on probabilities summed over pixels and batch + KL summed;
* pythae's VAE: per-sample sums (squared error "mse", or BCE on probabilities) + KL, averaged over
  the batch, with the two terms logged separately;
* AntixK/PyTorch-VAE's VanillaVAE: the per-element mean squared error + kld_weight x the
  batch-mean KL, logging the reconstruction term and minus the KL.
"""
import pytest
import torch
import torch.nn.functional as F

import fastvae


def _kl_rows(mu, logvar):
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


# ---- the conventions, from their formulas -----------------------------------------------------

def examples_loss(recon, x, mu, logvar):
    return F.binary_cross_entropy(recon, x.view(-1, 784), reduction="sum") + _kl_rows(mu, logvar).sum()


def pythae_loss(recon, x, mu, logvar, kind):
    B = x.shape[0]
    per = (F.mse_loss if kind == "mse" else F.binary_cross_entropy)(
        recon.reshape(B, -1), x.reshape(B, -1), reduction="none").sum(-1)
    kl = _kl_rows(mu, logvar)
    return (per + kl).mean(0), per.mean(0), kl.mean(0)


def antixk_loss(recon, x, mu, logvar, kld_weight):
    rec = F.mse_loss(recon, x)
    kl = torch.mean(_kl_rows(mu, logvar), dim=0)
    return {"loss": rec + kld_weight * kl, "Reconstruction_Loss": rec, "KLD": -kl}


# ---- the replacements, as the README gives them -------------------------------------------------

def examples_port(recon, x, mu, logvar, backend):
    return fastvae.elbo_loss(recon, x, mu, logvar, from_logits=False, backend=backend)


def pythae_port(recon, x, mu, logvar, kind, backend):
    out = fastvae.elbo_loss(recon, x, mu, logvar, reduction="batchmean", return_components=True,
                            likelihood="mse" if kind == "mse" else "bernoulli",
                            from_logits=kind == "mse", backend=backend)
    return out.loss, out.reconstruction, out.kl


def antixk_port(recon, x, mu, logvar, kld_weight, backend):
    n = x[0].numel()
    out = fastvae.elbo_loss(recon, x, mu, logvar, likelihood="mse", reduction="batchmean",
                            beta=kld_weight * n, return_components=True, backend=backend)
    return {"loss": out.loss / n, "Reconstruction_Loss": out.reconstruction.detach() / n,
            "KLD": -out.kl.detach()}


CASES = {
    "examples": (lambda r, x, m, v: (examples_loss(r, x, m, v),),
                 lambda r, x, m, v, b: (examples_port(r, x, m, v, b),), "probs", (784,)),
    "pythae-mse": (lambda r, x, m, v: pythae_loss(r, x, m, v, "mse"),
                   lambda r, x, m, v, b: pythae_port(r, x, m, v, "mse", b), "values", (1, 28, 28)),
    "pythae-bce": (lambda r, x, m, v: pythae_loss(r, x, m, v, "bce"),
                   lambda r, x, m, v, b: pythae_port(r, x, m, v, "bce", b), "probs", (1, 28, 28)),
    "antixk": (lambda r, x, m, v: tuple(antixk_loss(r, x, m, v, 0.00025).values()),
               lambda r, x, m, v, b: tuple(antixk_port(r, x, m, v, 0.00025, b).values()), "values",
               (3, 8, 8)),
}


def _inputs(kind, shape, B=16, L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, *shape, generator=g)
    recon = torch.sigmoid(s) if kind == "probs" else s
    x = torch.rand(B, *shape, generator=g)
    return recon, x, torch.randn(B, L, generator=g), torch.randn(B, L, generator=g)


@pytest.mark.parametrize("case", sorted(CASES))
def test_port_values_and_gradients(backend_device, case):
    backend, device = backend_device
    ref_fn, port_fn, kind, shape = CASES[case]
    inputs = [t.to(device) for t in _inputs(kind, shape)]
    leaves_r = [t.clone().requires_grad_() for t in inputs]
    leaves_p = [t.clone().requires_grad_() for t in inputs]
    leaves_r[1].requires_grad_(False)
    leaves_p[1].requires_grad_(False)
    ref = ref_fn(*leaves_r)
    ours = port_fn(*leaves_p, backend)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-6, atol=1e-6)
    ref[0].backward()
    ours[0].backward()
    for a, b in zip(leaves_p, leaves_r):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5 * b.grad.abs().max().item())


@pytest.mark.parametrize("case", sorted(CASES))
def test_port_trains_the_same(case):
    """A small MLP VAE trained 40 Adam steps with the convention's loss and with its fastvae
    replacement, from the same weights and noise: the same loss at every step."""
    ref_fn, port_fn, kind, shape = CASES[case]
    D = torch.Size(shape).numel()

    def model():
        torch.manual_seed(0)
        enc, dec = torch.nn.Linear(D, 2 * 4), torch.nn.Linear(4, D)
        return enc, dec

    def step_losses(loss_fn):
        enc, dec = model()
        opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-2)
        g = torch.Generator().manual_seed(1)
        x = torch.rand(32, *shape, generator=g)
        out = []
        for _ in range(40):
            mu, logvar = enc(x.reshape(32, -1)).chunk(2, dim=1)
            z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=g)
            r = dec(z)
            r = (torch.sigmoid(r) if kind == "probs" else r).reshape(32, *shape)
            loss = loss_fn(r, x, mu, logvar)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return torch.tensor(out, dtype=torch.float64)

    ref = step_losses(ref_fn)
    ours = step_losses(lambda r, x, m, v: port_fn(r, x, m, v, "torch"))
    assert ref[-1] < ref[0]  # it trained
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
