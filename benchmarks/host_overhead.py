"""Host time of one call on the Triton path, kernels excluded: what a GPU user pays per call in
Python and PyTorch dispatch before any kernel runs. Runs without a GPU.

    python benchmarks/host_overhead.py [--batch 128] [--calls 2000]

The kernels are defined under Triton's interpreter (TRITON_INTERPRET=1, set here before triton
is imported) on CPU tensors, and every launch is replaced by a no-op that counts it, so the
time is fastvae's own host code: argument checks, backend choice, buffer allocation, grid
sizing, autograd. Each case runs twice in the same process: through ``torch.ops.fastvae.*``
(the registered ``triton_op``s, what torch.compile traces) and through the eager path that
``fastvae.elbo_loss`` / ``fastvae.reparameterize`` take when nothing traces (an
``autograd.Function`` that launches the kernels itself). Medians of 7 repeats.

On a GPU, Triton's own launcher adds its cost per launch on top (not measured here).

For scale, the last rows time the seed's eager loss (``fastvae.baselines.eager_elbo``: sigmoid,
BCE, KL, about ten ATen ops forward) and ``reparameterize``'s eager formula on [1, 8] tensors,
where the arithmetic is negligible: what ATen's dispatch and autograd cost per call on this host,
before any GPU launch.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

LAUNCHES: list[str] = []


def _no_launch(self, grid):
    def launch(*args, **kwargs):
        LAUNCHES.append(self.fn.__name__)
    return launch


InterpretedFunction.__getitem__ = _no_launch

import fastvae  # noqa: E402
from fastvae import _backend, _triton_ops  # noqa: E402


def cases(batch: int):
    g = torch.Generator().manual_seed(0)
    recon = torch.randn(batch, 784, generator=g, requires_grad=True)
    x = torch.rand(batch, 784, generator=g)
    mu = torch.randn(batch, 20, generator=g, requires_grad=True)
    logvar = torch.randn(batch, 20, generator=g, requires_grad=True)
    ones = torch.ones(batch, 20)

    def elbo_fwd():
        return fastvae.elbo_loss(recon, x, mu, logvar, backend="triton")

    def elbo_full():
        return torch.autograd.grad(elbo_fwd(), (recon, mu, logvar))

    def reparam_fwd():
        return fastvae.reparameterize(mu, logvar, backend="triton")

    def reparam_full():
        return torch.autograd.grad(reparam_fwd(), (mu, logvar), ones)

    return {"elbo-fwd": elbo_fwd, "elbo-full": elbo_full, "reparam-fwd": reparam_fwd,
            "reparam-full": reparam_full}


def eager_cases():
    """The eager PyTorch references on [1, 8] tensors (arithmetic negligible)."""
    from fastvae.baselines import eager_elbo

    g = torch.Generator().manual_seed(0)
    recon = torch.randn(1, 8, generator=g, requires_grad=True)
    x = torch.rand(1, 8, generator=g)
    mu = torch.randn(1, 8, generator=g, requires_grad=True)
    logvar = torch.randn(1, 8, generator=g, requires_grad=True)
    ones = torch.ones(1, 8)

    def elbo_full():
        return torch.autograd.grad(eager_elbo(recon, x, mu, logvar), (recon, mu, logvar))

    def reparam_fwd():
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def reparam_full():
        return torch.autograd.grad(reparam_fwd(), (mu, logvar), ones)

    return {"elbo-fwd": lambda: eager_elbo(recon, x, mu, logvar), "elbo-full": elbo_full,
            "reparam-fwd": reparam_fwd, "reparam-full": reparam_full}


def time_case(fn, calls: int) -> tuple[float, float]:
    for _ in range(50):
        fn()
    runs = []
    for _ in range(7):
        LAUNCHES.clear()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t0) / calls)
    return statistics.median(runs), len(LAUNCHES) / calls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args(argv)
    if not _backend.interpreter_enabled():
        print("the kernels did not load under the interpreter", file=sys.stderr)
        return 1
    print(f"fastvae host time per call, kernels excluded (B={args.batch}, 784 x 20; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, ATen CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()})")
    print(f"{'case':14s} {'torch.ops path':>15s} {'eager path':>12s} {'ratio':>7s} {'launches':>9s} "
          f"{'eager PyTorch':>14s}")
    real_eager = _triton_ops._eager
    reference = eager_cases()
    for name, fn in cases(args.batch).items():
        _triton_ops._eager = lambda *tensors: False
        try:
            ops, n_ops = time_case(fn, args.calls)
        finally:
            _triton_ops._eager = real_eager
        eager, n = time_case(fn, args.calls)
        assert n == n_ops, (name, n, n_ops)
        ref = time_case(reference[name], args.calls)[0]
        print(f"{name:14s} {ops * 1e6:12.1f} us {eager * 1e6:9.1f} us {ops / eager:6.2f}x {n:9.0f} "
              f"{ref * 1e6:11.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
