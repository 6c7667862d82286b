"""Kernel-level benchmarks: the VAE loss (ELBO) and the reparameterisation trick.

Groups ``elbo-{fwd,bwd,full}-B{batch}`` and ``reparam-{fwd,full}-B{batch}`` (``-bf16`` appended for
bf16 on CUDA), at batch 128, 4096 and 65536 with 784 features and a latent size of 20; for the other
decoder likelihoods ``elbo-gaussian-full-B{batch}`` (sigma = 0.5) and ``elbo-cb-full-B{batch}``
(continuous Bernoulli), forward + backward.
Providers:

* ``eager``: ``fastvae.baselines.eager_elbo`` (sigmoid + ``F.binary_cross_entropy`` + KL sum) and
  ``eager_reparameterize`` (``mu + exp(logvar / 2) * randn_like``), the shared baselines.
* ``compile``: ``torch.compile`` (default mode, static shapes) of ``fastvae.baselines.logits_elbo``
  and of ``eager_reparameterize``.
* for the other likelihoods, ``eager``: ``fastvae.baselines.eager_gaussian_elbo`` /
  ``eager_cb_elbo`` (torch.distributions' ``log_prob``, as a user writes it) and ``compile``: the
  validation-free ``gaussian_elbo`` / ``cb_elbo``.
* ``fastvae``: ``fastvae.elbo_loss`` / ``fastvae.reparameterize`` with the default backend: the
  Triton kernels on CUDA, the PyTorch fallback on CPU.
* ``copy``: a device-to-device copy that moves as many bytes as the op's byte model (see
  README.md), the bandwidth reference for the GB/s column.

Modes, all with inputs that require grad as in training:

* ``fwd``: the forward (the autograd graph is built, as in a training step).
* ``bwd``: the backward only. The forward runs in ``setup`` before every timed call, outside the
  timed region, and the timed call is ``torch.autograd.grad`` of that graph. Providers may move
  work between forward and backward (eager keeps the sigmoid output for its backward; a fused
  kernel may compute the recon gradient in its forward), so compare ``full`` for the headline.
* ``full``: forward + backward, the cost of the loss in a training step.

Gradients are taken with ``torch.autograd.grad`` so nothing accumulates in ``.grad`` between
calls. fastvae and compile are checked once per case against the eager result (cheap, untimed).
"""
from __future__ import annotations

import functools

import os

import pytest
import torch

import fastvae
from fastvae.baselines import (cb_elbo, eager_cb_elbo, eager_elbo, eager_gaussian_elbo,
                               eager_reparameterize, gaussian_elbo, logits_elbo)

FEATURES = 784
LATENT = 20
SIZES = (128, 4096, 65536)
PROVIDERS = ("eager", "compile", "fastvae", "copy")

# one static-shape graph per size, dtype and grad mode: more than dynamo's default of 8
_dyn = torch._dynamo.config
_limit = "recompile_limit" if hasattr(_dyn, "recompile_limit") else "cache_size_limit"
setattr(_dyn, _limit, max(getattr(_dyn, _limit), 32))


@functools.lru_cache(maxsize=None)
def compiled(fn):
    """``torch.compile`` of a baseline, shared by all cases; it compiles on its first call."""
    return torch.compile(fn, dynamic=False)


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


GROUP_SUFFIX = {torch.float32: "", torch.bfloat16: "-bf16", torch.float16: "-fp16"}


def group_name(op: str, mode: str, batch: int, dtype: torch.dtype) -> str:
    suffix = GROUP_SUFFIX.get(dtype, f"-{_short(dtype)}")
    return f"{op}-{mode}-B{batch}{suffix}"


# ---- byte model: the minimal bytes each op must move (documented in README.md) -----------------

def elbo_bytes(mode: str, batch: int, dtype: torch.dtype) -> int:
    s = torch.finfo(dtype).bits // 8
    reads = (2 * batch * FEATURES + 2 * batch * LATENT) * s  # recon, x, mu, logvar
    if mode == "fwd":
        return reads
    # bwd, and full (one fused pass could do both): + write d recon, d mu, d logvar
    return reads + (batch * FEATURES + 2 * batch * LATENT) * s


def reparam_bytes(mode: str, batch: int, dtype: torch.dtype) -> int:
    s = torch.finfo(dtype).bits // 8
    n = batch * LATENT
    fwd = 3 * n * s  # read mu, logvar; write z (the noise is drawn in registers)
    if mode == "fwd":
        return fwd
    # backward: read d z and logvar, write d logvar; d mu is d z itself, nothing is written for it
    return fwd + 3 * n * s


# ---- inputs, cached across the providers of one case -----------------------------------------

@functools.lru_cache(maxsize=1)
def _elbo_case(batch: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator().manual_seed(1000 + batch)
    recon = 2.0 * torch.randn(batch, FEATURES, generator=g)  # decoder logits
    x = torch.rand(batch, FEATURES, generator=g)  # targets in [0, 1]
    mu = torch.randn(batch, LATENT, generator=g)
    logvar = 0.5 * torch.randn(batch, LATENT, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (recon, x, mu, logvar))


def elbo_inputs(batch, dtype, device):
    inputs = _elbo_case(batch, dtype, device)
    recon, x, mu, logvar = (t.detach() for t in inputs)
    return recon.requires_grad_(), x, mu.requires_grad_(), logvar.requires_grad_()


@functools.lru_cache(maxsize=1)
def elbo_reference(batch, dtype, device):
    """The eager loss and gradients in float32 on the same inputs."""
    inputs = _elbo_case(batch, dtype, device)
    recon, x, mu, logvar = (t.detach().float() for t in inputs)
    leaves = [t.requires_grad_() for t in (recon, mu, logvar)]
    loss = eager_elbo(recon, x, mu, logvar)
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads


@functools.lru_cache(maxsize=1)
def _reparam_case(batch: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator().manual_seed(2000 + batch)
    mu = torch.randn(batch, LATENT, generator=g)
    logvar = 0.5 * torch.randn(batch, LATENT, generator=g)
    grad_z = torch.randn(batch, LATENT, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (mu, logvar, grad_z))


def reparam_inputs(batch, dtype, device):
    mu, logvar, grad_z = _reparam_case(batch, dtype, device)
    return mu.detach().requires_grad_(), logvar.detach().requires_grad_(), grad_z


def _tolerances(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


def _copy_fn(nbytes: int, device: torch.device):
    src = torch.ones(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


ELBO_FNS = {"eager": lambda: eager_elbo, "compile": lambda: compiled(logits_elbo),
            "fastvae": lambda: fastvae.elbo_loss}
REPARAM_FNS = {"eager": lambda: eager_reparameterize, "compile": lambda: compiled(eager_reparameterize),
               "fastvae": lambda: fastvae.reparameterize}


# ---- ELBO --------------------------------------------------------------------------------------

@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", SIZES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("mode", ("fwd", "bwd", "full"))
def test_elbo(bench, device, dtype, mode, batch, provider):
    group = group_name("elbo", mode, batch, dtype)
    nbytes = elbo_bytes(mode, batch, dtype)
    meta = dict(op="elbo", mode=mode, batch=batch, features=FEATURES, latent=LATENT,
                dtype=_short(dtype))
    if provider == "copy":
        bench(_copy_fn(nbytes, device), group=group, provider=provider, bytes_moved=nbytes, **meta)
        return

    loss_fn = ELBO_FNS[provider]()
    recon, x, mu, logvar = elbo_inputs(batch, dtype, device)
    leaves = (recon, mu, logvar)

    if mode == "fwd":
        bench(lambda: loss_fn(recon, x, mu, logvar), group=group, provider=provider,
              bytes_moved=nbytes, **meta)
    elif mode == "full":
        def step():
            return torch.autograd.grad(loss_fn(recon, x, mu, logvar), leaves)
        bench(step, group=group, provider=provider, bytes_moved=nbytes, **meta)
    else:  # bwd: build the graph in setup, time only its backward
        bench(lambda loss: torch.autograd.grad(loss, leaves),
              setup=lambda: (loss_fn(recon, x, mu, logvar),),
              group=group, provider=provider, bytes_moved=nbytes, **meta)

    # correctness check against eager, untimed; after the benchmark, whose first call compiles
    if provider != "eager" and mode != "bwd":
        ref_loss, ref_grads = elbo_reference(batch, dtype, device)
        loss = loss_fn(recon, x, mu, logvar)
        tol = _tolerances(dtype)
        torch.testing.assert_close(loss.detach().float(), ref_loss, rtol=tol["rtol"], atol=0.0)
        if mode == "full":
            for got, want in zip(torch.autograd.grad(loss, leaves), ref_grads):
                assert got.dtype == dtype
                torch.testing.assert_close(got.float(), want, **tol)
        del loss


# ---- the other likelihoods: elbo-{gaussian,cb}-full ----------------------------------------------

SIGMA = 0.5
_gaussian_elbo = functools.partial(gaussian_elbo, sigma=SIGMA)  # one object: compiled() caches by it
LIKELIHOOD_FNS = {
    "gaussian": {"eager": lambda: functools.partial(eager_gaussian_elbo, sigma=SIGMA),
                 "compile": lambda: compiled(_gaussian_elbo),
                 "fastvae": lambda: functools.partial(fastvae.elbo_loss, likelihood="gaussian", sigma=SIGMA)},
    "cb": {"eager": lambda: eager_cb_elbo, "compile": lambda: compiled(cb_elbo),
           "fastvae": lambda: functools.partial(fastvae.elbo_loss, likelihood="continuous_bernoulli")},
}


@functools.lru_cache(maxsize=1)
def likelihood_reference(likelihood, batch, dtype, device, ref_dtype):
    """The eager loss and gradients in ``ref_dtype`` on the same inputs, as float32. The check is
    against float64: in float32 torch.distributions' continuous Bernoulli gradient is off by up to
    100% near lam = 1/2 (its log-normaliser cancels), eager and compiled alike."""
    recon, x, mu, logvar = (t.detach().to(ref_dtype) for t in _elbo_case(batch, dtype, device))
    leaves = [t.requires_grad_() for t in (recon, mu, logvar)]
    loss = LIKELIHOOD_FNS[likelihood]["eager"]()(recon, x, mu, logvar)
    return loss.detach().float(), [g.float() for g in torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", SIZES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("likelihood", tuple(LIKELIHOOD_FNS))
def test_elbo_likelihood(bench, device, dtype, likelihood, batch, provider, request):
    if batch > 4096 and request.config.getoption("benchmark_disable") and device.type == "cpu":
        # the smoke run covers every code path at 128 and 4096; at 65536 eager alone takes
        # tens of seconds on a CPU (the continuous Bernoulli's ~30 passes over 51M elements)
        pytest.skip("B65536 on CPU only when timing (--benchmark-disable given)")
    group = group_name(f"elbo-{likelihood}", "full", batch, dtype)
    nbytes = elbo_bytes("full", batch, dtype)  # sigma is a number: the Bernoulli loss's bytes
    meta = dict(op=f"elbo-{likelihood}", mode="full", batch=batch, features=FEATURES, latent=LATENT,
                dtype=_short(dtype))
    if provider == "copy":
        bench(_copy_fn(nbytes, device), group=group, provider=provider, bytes_moved=nbytes, **meta)
        return
    loss_fn = LIKELIHOOD_FNS[likelihood][provider]()
    recon, x, mu, logvar = elbo_inputs(batch, dtype, device)
    leaves = (recon, mu, logvar)

    def step():
        return torch.autograd.grad(loss_fn(recon, x, mu, logvar), leaves)
    bench(step, group=group, provider=provider, bytes_moved=nbytes, **meta)

    if provider != "eager":  # untimed check against eager, after the first (compiling) call
        ref_loss, ref_grads = likelihood_reference(likelihood, batch, dtype, device, torch.float64)
        loss = loss_fn(recon, x, mu, logvar)
        tol = _tolerances(dtype)
        torch.testing.assert_close(loss.detach().float(), ref_loss, rtol=tol["rtol"], atol=0.0)
        if provider == "compile" and likelihood == "cb":
            return  # torch's fp32 d log C is off near lam = 1/2 (see likelihood_reference)
        for got, want in zip(torch.autograd.grad(loss, leaves), ref_grads):
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), want, **tol)
        del loss


# ---- reparameterize ------------------------------------------------------------------------------

@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", SIZES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("mode", ("fwd", "full"))
def test_reparameterize(bench, device, dtype, mode, batch, provider):
    group = group_name("reparam", mode, batch, dtype)
    nbytes = reparam_bytes(mode, batch, dtype)
    meta = dict(op="reparam", mode=mode, batch=batch, latent=LATENT, dtype=_short(dtype))
    if provider == "copy":
        bench(_copy_fn(nbytes, device), group=group, provider=provider, bytes_moved=nbytes, **meta)
        return

    fn = REPARAM_FNS[provider]()
    mu, logvar, grad_z = reparam_inputs(batch, dtype, device)

    if mode == "fwd":
        bench(lambda: fn(mu, logvar), group=group, provider=provider, bytes_moved=nbytes, **meta)
    else:
        def step():
            return torch.autograd.grad(fn(mu, logvar), (mu, logvar), grad_z)
        bench(step, group=group, provider=provider, bytes_moved=nbytes, **meta)

    if provider != "eager":  # untimed check: z = mu + std * eps with eps ~ N(0, 1)
        z = fn(mu, logvar)
        assert z.shape == mu.shape and z.dtype == dtype
        std = torch.exp(0.5 * logvar.detach().float())
        eps = (z.detach().float() - mu.detach().float()) / std
        assert torch.isfinite(eps).all()
        if eps.numel() >= 50_000:
            assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1.0) < 0.05
        if mode == "full":
            dmu, dlogvar = torch.autograd.grad(z, (mu, logvar), grad_z)
            torch.testing.assert_close(dmu, grad_z)
            if dtype == torch.float32:  # z - mu is too coarse in bf16 to recover eps
                want = 0.5 * grad_z * (z.detach() - mu.detach())
                torch.testing.assert_close(dlogvar, want, rtol=1e-4, atol=1e-5)
        del z


def test_host_overhead_runs_through_tritons_real_launcher(tmp_path):
    """benchmarks/host_overhead.py end to end in its own process (Triton's real launcher built
    against the stub libcuda; a few calls per case): every case and floor is timed, and each public
    call makes the launches it should (what it reports, not how fast)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.host_overhead", "--calls", "5", "--repeats", "2",
                          "--json", str(tmp_path / "host.json"), "--stub-dir", str(tmp_path / "stub")],
                         cwd=root, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode == 3:
        pytest.skip(out.stderr.strip())
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "host.json").read_text())["rows"]
    # one launch per forward (the sums' second stage runs in the kernel's last program), one more
    # in each backward; the no-launch variants launch nothing, eager PyTorch never
    want = {"elbo-fwd": 1, "elbo-full": 2, "reparam-fwd": 1, "reparam-full": 2}
    assert {case: rows[f"fastvae {case}"]["launches"] for case in want} == want
    assert all(rows[f"no-launch {case}"]["launches"] == 0 and rows[f"eager {case}"]["launches"] == 0
               for case in want)
    assert rows["floor compiled-run"]["launches"] == 1
    assert all(r["cpu_us"] > 0 and r["wall_us"] > 0 for r in rows.values())
    assert "per launch" in out.stdout


