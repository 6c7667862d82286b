"""A real client of the batch-mean convention: pythae's VAE (clementchadebec/benchmark_VAE), trained
with its own loss and with fastvae's in its place, from the same weights and noise.

Needs pythae, which fastvae does not depend on (``pip install pythae``; not run in CI). The port
is a subclass whose ``loss_function`` is fastvae (the 5 lines marked ``# port``);
everything else is pythae's: its default MLP encoder and decoder (a sigmoid output), its
reparameterisation, its forward pass and its ``ModelOutput``. pythae's model is trained on real
MNIST digits (fastvae's mnist-5k) with Adam, for both of its reconstruction losses; at every step
the port, sharing its weights, is evaluated on the same batch and noise, and the loss, its two
logged terms and the parameter gradients are compared. (Two separate trainings drift apart
slowly, as any two fp32 trainings whose first steps differ by one rounding do: about 1e-6 after
100 steps here.)

    python benchmarks/clients/pythae_port.py --steps 200
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch

from importlib.metadata import version

import fastvae
from pythae.models import VAE, VAEConfig


class FastELBOVAE(VAE):
    """pythae's VAE with fastvae's loss. pythae 0.1.2 (the release on PyPI) defines its "mse" as
    0.5 * sum (x - recon)^2: a unit Gaussian without its constant (its main branch has dropped the
    0.5: there ``likelihood="mse"`` with no constant is the port)."""

    def loss_function(self, recon_x, x, mu, log_var, z):
        mse = self.model_config.reconstruction_loss == "mse"                             # port
        out = fastvae.elbo_loss(recon_x, x, mu, log_var, reduction="batchmean",           # port
                                likelihood="gaussian" if mse else "bernoulli", from_logits=mse,  # port
                                return_components=True)
        c = 0.5 * math.log(2 * math.pi) * x[0].numel() if mse else 0.0                   # port
        return out.loss - c, out.reconstruction - c, out.kl                              # port


def lockstep(ref, port, x, steps, batch, seed):
    """Train ``ref`` with Adam; at every step also evaluate ``port`` (the same modules) on the same
    batch and noise. Returns per-step (loss, reconstruction, kl) of both, and the largest relative
    difference of the parameter gradients (in norm) over the steps."""
    params = list(ref.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    a, b, grad_rel = [], [], 0.0
    for _ in range(steps):
        xb = x[torch.randint(0, x.shape[0], (batch,), generator=g)]
        rng = torch.get_rng_state()
        out_a = ref({"data": xb})
        torch.set_rng_state(rng)           # the same noise for the port
        out_b = port({"data": xb})
        ga = torch.autograd.grad(out_a.loss, params)
        gb = torch.autograd.grad(out_b.loss, params)
        grad_rel = max(grad_rel, max(((u - v).norm() / u.norm()).item() for u, v in zip(ga, gb)))
        for p_, gr in zip(params, ga):
            p_.grad = gr
        opt.step()
        a.append((out_a.loss.item(), out_a.recon_loss.item(), out_a.reg_loss.item()))
        b.append((out_b.loss.item(), out_b.recon_loss.item(), out_b.reg_loss.item()))
    return torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), grad_rel


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    data = fastvae.load_dataset("mnist-5k")
    x = (data.train_x.float() / 255.0).reshape(-1, 1, 28, 28)
    for kind in ("bce", "mse"):
        cfg = VAEConfig(input_dim=(1, 28, 28), latent_dim=16, reconstruction_loss=kind)
        torch.manual_seed(0)
        ref = VAE(cfg)
        port = FastELBOVAE(copy.deepcopy(cfg), encoder=ref.encoder, decoder=ref.decoder)  # shared weights
        t0 = time.perf_counter()
        a, b, grad_rel = lockstep(ref, port, x, args.steps, args.batch, seed=1)
        rel = ((b - a).abs() / a.abs()).max(0).values
        print(f"pythae {version('pythae')} VAE, "
              f"reconstruction_loss={kind!r}, {args.steps} Adam steps of {args.batch} mnist-5k digits "
              f"(loss {a[0, 0]:.2f} -> {a[-1, 0]:.2f}), fastvae's port evaluated on the same weights, "
              f"batch and noise at every step: largest relative difference of the loss {rel[0]:.1e}, "
              f"reconstruction {rel[1]:.1e}, kl {rel[2]:.1e}, parameter gradients {grad_rel:.1e} "
              f"({time.perf_counter() - t0:.1f} s, fastvae backend {fastvae.default_backend()})")


if __name__ == "__main__":
    main()
