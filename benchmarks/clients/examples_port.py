"""A real client of the sum convention: pytorch/examples' ``vae/main.py``, trained with its own
``loss_function`` and with fastvae's in its place, from the same weights and noise.

pytorch/examples is not part of fastvae (nor run in CI): pass a checkout of it (or the path of its
``vae/main.py``) with ``--examples``. main.py parses arguments, downloads MNIST and builds its
model at import time, so this script executes only its imports and the definitions it needs (the
``VAE`` class and ``loss_function``, taken from the file's syntax tree, unmodified). The port is
the line marked ``# port``. The model is trained on real MNIST digits (fastvae's mnist-5k) with
Adam(lr=1e-3) and batch 128, as main.py does; at every step the port is evaluated on the same
weights, batch and noise, and the loss and the parameter gradients are compared.

A second, non-identical port is also checked: the decoder without its sigmoid and
``from_logits=True`` (the same objective, computed stably on logits; it differs where
``F.binary_cross_entropy`` clamps its logs at -100 and where the sigmoid rounds to 0 or 1).

    python benchmarks/clients/examples_port.py --examples /path/to/pytorch-examples --steps 200  # ~20 s
    python benchmarks/clients/examples_port.py --examples ... --backend triton   # the interpreter: ~6 min
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import add_run_options, import_fastvae


def load_examples(path):
    """``VAE`` and ``loss_function`` from pytorch/examples' vae/main.py (a checkout or the file),
    executed from the file's own source: its imports, then the two definitions; nothing else."""
    path = Path(path)
    if path.is_dir():
        path = path / "vae" / "main.py"
    if not path.is_file():
        raise FileNotFoundError(f"no pytorch/examples vae/main.py at {path}")
    tree = ast.parse(path.read_text(), filename=str(path))
    wanted = {"VAE", "loss_function"}
    ns = {"__name__": "examples_vae_main", "__file__": str(path)}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            try:   # torchvision is only used by main.py's data loading and image saving
                exec(compile(ast.Module([node], []), str(path), "exec"), ns)
            except ImportError:
                pass
        elif isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in wanted:
            exec(compile(ast.Module([node], []), str(path), "exec"), ns)
            wanted.discard(node.name)
    if wanted:
        raise RuntimeError(f"{path} defines no {', '.join(sorted(wanted))}")
    return ns["VAE"], ns["loss_function"]


def make_logits_vae(VAE):
    """The "better" port: examples' VAE whose decoder returns logits (its sigmoid dropped)."""
    class LogitsVAE(VAE):
        def decode(self, z):
            return self.fc4(F.relu(self.fc3(z)))
    return LogitsVAE


def lockstep(model, loss_ref, loss_port, x, steps, batch, seed, port_model=None):
    """Train ``model`` with ``loss_ref`` and Adam(lr=1e-3), as main.py does; at every step also
    evaluate ``loss_port`` on ``port_model`` (default: the same model; it shares the weights) with
    the same batch and noise. Returns the per-step losses of both (float64) and the largest
    relative difference (in norm) of the parameter gradients over the steps and parameters."""
    port_model = model if port_model is None else port_model
    params = list(model.parameters())
    assert [p.data_ptr() for p in port_model.parameters()] == [p.data_ptr() for p in params]
    opt = torch.optim.Adam(params, lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    a, b, grad_rel = [], [], 0.0
    for _ in range(steps):
        data = x[torch.randint(0, x.shape[0], (batch,), generator=g)]
        rng = torch.get_rng_state()
        recon_batch, mu, logvar = model(data)
        loss_a = loss_ref(recon_batch, data, mu, logvar)
        torch.set_rng_state(rng)           # the same noise for the port
        recon_p, mu_p, logvar_p = port_model(data)
        loss_b = loss_port(recon_p, data, mu_p, logvar_p)
        ga = torch.autograd.grad(loss_a, params)
        gb = torch.autograd.grad(loss_b, params)
        grad_rel = max(grad_rel, max(((u - v).norm() / u.norm()).item() for u, v in zip(ga, gb)))
        for p_, gr in zip(params, ga):
            p_.grad = gr
        opt.step()
        a.append(loss_a.item())
        b.append(loss_b.item())
    return torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), grad_rel


def train_alone(model, loss_fn, x, steps, batch, seed):
    """Train ``model`` on its own loss (main.py's loop); returns the per-step losses."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    out = []
    for _ in range(steps):
        data = x[torch.randint(0, x.shape[0], (batch,), generator=g)]
        opt.zero_grad()
        recon_batch, mu, logvar = model(data)
        loss = loss_fn(recon_batch, data, mu, logvar)
        loss.backward()
        opt.step()
        out.append(loss.item())
    return torch.tensor(out, dtype=torch.float64)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", required=True,
                   help="a checkout of github.com/pytorch/examples, or the path of its vae/main.py")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=128)
    add_run_options(p)
    args = p.parse_args()
    fastvae = import_fastvae(args)
    from fastvae._backend import resolve
    VAE, loss_function = load_examples(args.examples)

    def port(recon_batch, data, mu, logvar):
        return fastvae.elbo_loss(recon_batch, data, mu, logvar, from_logits=False)  # port

    def port_logits(logits, data, mu, logvar):
        return fastvae.elbo_loss(logits, data, mu, logvar)

    data = fastvae.load_dataset("mnist-5k")
    x = (data.train_x.float() / 255.0).reshape(-1, 1, 28, 28)   # main.py's ToTensor()
    common = (f"{args.steps} Adam steps of {args.batch} mnist-5k digits, {args.threads} thread(s), "
              f"fastvae's {resolve(args.backend, x)} path")

    torch.manual_seed(1)
    model = VAE()
    t0 = time.perf_counter()
    a, b, grad_rel = lockstep(model, loss_function, port, x, args.steps, args.batch, seed=1)
    rel = ((b - a).abs() / a.abs()).max().item()
    print(f"pytorch/examples vae/main.py: VAE + loss_function, {common} (loss/sample "
          f"{a[0] / args.batch:.1f} -> {a[-1] / args.batch:.1f}); the port evaluated on the same weights, "
          f"batch and noise at every step: largest relative difference of the loss {rel:.1e}, "
          f"parameter gradients {grad_rel:.1e} ({time.perf_counter() - t0:.1f} s)")

    # The logits port: the same weights with the sigmoid moved into the loss.
    torch.manual_seed(1)
    model = VAE()
    logits_model = make_logits_vae(VAE)()
    for name in ("fc1", "fc21", "fc22", "fc3", "fc4"):
        setattr(logits_model, name, getattr(model, name))    # shared weights
    t0 = time.perf_counter()
    a, b, grad_rel = lockstep(model, loss_function, port_logits, x, args.steps, args.batch, seed=1,
                              port_model=logits_model)
    rel = ((b - a).abs() / a.abs()).max().item()
    # ... and trained on its own from the same start: the objective is the same, not the rounding.
    torch.manual_seed(1)
    alone = make_logits_vae(VAE)()
    la = train_alone(alone, port_logits, x, args.steps, args.batch, seed=1)
    last = slice(-20, None)
    print(f"logits port (decoder without its sigmoid, from_logits=True), in lockstep with main.py's "
          f"training: largest relative difference of the loss {rel:.1e}, parameter gradients "
          f"{grad_rel:.1e}; trained on its own from the same weights, mean loss/sample of the last 20 "
          f"steps {la[last].mean() / args.batch:.2f} vs main.py's {a[last].mean() / args.batch:.2f} "
          f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    sys.exit(main())
