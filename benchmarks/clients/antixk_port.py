"""A real client of the per-element-mean convention: AntixK/PyTorch-VAE's ``VanillaVAE``, trained
with its own ``loss_function`` and with fastvae's in its place, from the same weights and noise.

PyTorch-VAE is not part of fastvae (nor run in CI): pass a checkout of it with ``--antixk`` (the
folder holding its ``models`` package, which is imported from there as is). The port is a subclass
whose ``loss_function`` is fastvae (the lines marked ``# port``); everything else is VanillaVAE's:
its conv encoder and decoder (BatchNorm, LeakyReLU, a tanh output; its decoder hard-codes 512
channels at 2x2, so 64x64 inputs and a last hidden width of 512), its reparameterisation and its
forward pass. It is called as PyTorch-VAE's experiment.py calls it:
``loss_function(*results, M_N=kld_weight, optimizer_idx=0, batch_idx=i)``, with configs/vae.yaml's
kld_weight (0.00025), Adam(lr=0.005) and batch 64. The data are real Fashion-MNIST images,
resized to 64x64 and repeated over 3 channels (CelebA-like shapes, values in [0, 1] like its
ToTensor()). At every step the port, sharing the weights, is evaluated on the same batch and
noise, and the loss, its two logged terms and the parameter gradients are compared; then both
are evaluated as experiment.py's validation step does (eval mode, no grad, M_N=1.0) on a test
batch. (The parameter gradients are compared tensor by tensor, in norm, except the biases of the
convolutions that feed a BatchNorm: their gradient is 0 in exact arithmetic, rounding noise of
~1e-8 here, so their difference is given relative to the norm of the whole gradient.)

    python benchmarks/clients/antixk_port.py --antixk /path/to/PyTorch-VAE --steps 100   # ~2.5 min
    python benchmarks/clients/antixk_port.py --antixk ... --backend triton   # the interpreter: ~17 min
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import add_run_options, import_fastvae


def load_vanilla_vae(path):
    path = Path(path)
    if not (path / "models" / "vanilla_vae.py").is_file():
        raise FileNotFoundError(f"no PyTorch-VAE checkout at {path} (models/vanilla_vae.py missing)")
    sys.path.insert(0, str(path))                     # its code imports `from models import BaseVAE`
    from models.vanilla_vae import VanillaVAE
    return VanillaVAE


def make_port(VanillaVAE, fastvae):
    class FastVanillaVAE(VanillaVAE):
        def loss_function(self, *args, **kwargs) -> dict:
            recons, input, mu, log_var = args[:4]; kld_weight, n = kwargs["M_N"], input[0].numel()  # port
            out = fastvae.elbo_loss(recons, input, mu, log_var, likelihood="mse", reduction="batchmean",  # port
                                    beta=kld_weight * n, return_components=True)                       # port
            return {"loss": out.loss / n, "Reconstruction_Loss": out.reconstruction.detach() / n,        # port
                    "KLD": -out.kl.detach()}                                                         # port
    return FastVanillaVAE


def batches(images, batch, seed):
    """Fashion-MNIST digits as 64x64x3 images in [0, 1], drawn at random."""
    g = torch.Generator().manual_seed(seed)
    while True:
        xb = images[torch.randint(0, images.shape[0], (batch,), generator=g)].float().div(255.0)
        xb = F.interpolate(xb.reshape(-1, 1, 28, 28), size=(64, 64), mode="bilinear", align_corners=False)
        yield xb.clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()


KEYS = ("loss", "Reconstruction_Loss", "KLD")


def bn_fed_biases(model):
    """Names of the biases of convolutions that feed a BatchNorm: their gradient is 0 in exact
    arithmetic (the BatchNorm subtracts the batch mean), so what is computed is rounding noise."""
    names = set()
    for prefix, module in model.named_modules():
        kids = list(module.named_children())
        for (name, conv), (_, nxt) in zip(kids, kids[1:]):
            if isinstance(conv, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) and conv.bias is not None \
                    and isinstance(nxt, torch.nn.BatchNorm2d):
                names.add(f"{prefix}.{name}.bias" if prefix else f"{name}.bias")
    return names


def lockstep(ref, port, images, test_images, steps, batch, kld_weight, seed):
    """Train ``ref`` with Adam(lr=0.005) on its own loss_function; at every step also evaluate
    ``port`` (the same modules) on the same batch and noise. Returns per-step (loss,
    Reconstruction_Loss, KLD) of both (float64), the largest relative difference (in norm) of the
    parameters' gradients over the steps (each tensor's; the BatchNorm-fed biases' are left out),
    the largest difference of those biases' gradients relative to the norm of the whole gradient,
    their number, and the per-step values of both in experiment.py's validation step (eval mode,
    no grad, M_N=1.0) on a test batch."""
    names, params = zip(*ref.named_parameters())
    assert [p.data_ptr() for p in port.parameters()] == [p.data_ptr() for p in params]
    zero = bn_fed_biases(ref)
    assert zero and zero <= set(names)
    opt = torch.optim.Adam(params, lr=0.005, weight_decay=0.0)
    torch.manual_seed(seed)
    data, test = batches(images, batch, seed), batches(test_images, batch, seed + 1)
    a, b, va, vb, grad_rel, zero_rel = [], [], [], [], 0.0, 0.0
    for i in range(steps):
        xb = next(data)
        rng = torch.get_rng_state()
        la = ref.loss_function(*ref(xb), M_N=kld_weight, optimizer_idx=0, batch_idx=i)
        torch.set_rng_state(rng)           # the same noise for the port
        lb = port.loss_function(*port(xb), M_N=kld_weight, optimizer_idx=0, batch_idx=i)
        ga = torch.autograd.grad(la["loss"], params)
        gb = torch.autograd.grad(lb["loss"], params)
        total = torch.cat([u.flatten() for u in ga]).norm()
        for name, u, v in zip(names, ga, gb):
            if name in zero:
                zero_rel = max(zero_rel, ((u - v).norm() / total).item())
            else:
                grad_rel = max(grad_rel, ((u - v).norm() / u.norm()).item())
        for p_, gr in zip(params, ga):
            p_.grad = gr
        opt.step()
        a.append([la[k].item() for k in KEYS])
        b.append([lb[k].item() for k in KEYS])
        xt = next(test)                    # experiment.py's validation_step
        ref.eval()
        with torch.no_grad():
            rng = torch.get_rng_state()
            la = ref.loss_function(*ref(xt), M_N=1.0, optimizer_idx=0, batch_idx=i)
            torch.set_rng_state(rng)
            lb = port.loss_function(*port(xt), M_N=1.0, optimizer_idx=0, batch_idx=i)
        ref.train()
        va.append([la[k].item() for k in KEYS])
        vb.append([lb[k].item() for k in KEYS])
    f64 = lambda t: torch.tensor(t, dtype=torch.float64)
    return f64(a), f64(b), grad_rel, zero_rel, len(zero), f64(va), f64(vb)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--antixk", required=True, help="a checkout of github.com/AntixK/PyTorch-VAE")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--latent", type=int, default=128, help="configs/vae.yaml's latent_dim")
    p.add_argument("--hidden", type=int, nargs=5, default=[16, 32, 64, 128, 512],
                   help="hidden_dims (5 stride-2 stages from 64x64 to 2x2; the last must be 512)")
    p.add_argument("--kld-weight", type=float, default=0.00025, help="M_N (configs/vae.yaml's kld_weight)")
    add_run_options(p)
    args = p.parse_args()
    fastvae = import_fastvae(args)
    from fastvae._backend import resolve
    VanillaVAE = load_vanilla_vae(args.antixk)
    FastVanillaVAE = make_port(VanillaVAE, fastvae)
    data = fastvae.load_dataset("fashion-mnist", download=False)
    torch.manual_seed(0)
    ref = VanillaVAE(3, args.latent, hidden_dims=list(args.hidden))
    port = FastVanillaVAE(3, args.latent, hidden_dims=list(args.hidden))
    for name, module in ref.named_children():
        setattr(port, name, module)                    # shared weights (and BatchNorm statistics)
    t0 = time.perf_counter()
    a, b, grad_rel, zero_rel, nzero, va, vb = lockstep(ref, port, data.train_x, data.test_x, args.steps,
                                                       args.batch, args.kld_weight, seed=1)
    rel = ((b - a).abs() / a.abs()).max(0).values
    vrel = ((vb - va).abs() / va.abs()).max(0).values
    assert (torch.sign(a[:, 2]) == torch.sign(b[:, 2])).all() and (va[:, 2] < 0).all()
    print(f"AntixK/PyTorch-VAE VanillaVAE(3, {args.latent}, hidden_dims={args.hidden}), "
          f"{args.steps} Adam steps of {args.batch} Fashion-MNIST images at 64x64x3 with M_N={args.kld_weight} "
          f"(loss {a[0, 0]:.4f} -> {a[-1, 0]:.4f}, KLD {a[0, 2]:.1f} -> {a[-1, 2]:.1f}), {args.threads} "
          f"thread(s), fastvae's {resolve(args.backend, torch.zeros(1))} path; the port evaluated on the same "
          f"weights, batch and noise at every step: largest relative difference of the loss {rel[0]:.1e}, "
          f"Reconstruction_Loss {rel[1]:.1e}, KLD {rel[2]:.1e} (same sign), parameter gradients "
          f"{grad_rel:.1e} (each tensor's; the {nzero} biases feeding a BatchNorm, 0 in exact "
          f"arithmetic, differ by {zero_rel:.1e} of the whole gradient's norm); validation step (eval "
          f"mode, M_N=1.0, a test batch, every step): loss {vrel[0]:.1e}, Reconstruction_Loss "
          f"{vrel[1]:.1e}, KLD {vrel[2]:.1e} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    sys.exit(main())
