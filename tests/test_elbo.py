"""fastvae.elbo_loss / FusedELBO against the float64 oracle, on every backend."""
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastvae
import oracle
from fastvae.baselines import eager_elbo

REDUCTIONS = ["sum", "batchmean", "none"]


def make_inputs(recon_shape, x_shape, L, *, from_logits, device, dtype=torch.float32,
                x_dtype=None, seed=0, logit_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    B = recon_shape[0]
    s = torch.randn(recon_shape, generator=g) * logit_scale
    recon = s if from_logits else torch.sigmoid(s)
    if x_dtype == torch.uint8:
        x = torch.randint(0, 256, x_shape, generator=g, dtype=torch.uint8)
    else:
        x = torch.rand(x_shape, generator=g).to(x_dtype or dtype)
    mu = torch.randn(B, L, generator=g)
    logvar = torch.randn(B, L, generator=g)
    return [t.to(device) if t.dtype == torch.uint8 else t.to(device, dtype if t is not x else t.dtype)
            for t in (recon, x, mu, logvar)]


def run(recon, x, mu, logvar, grad_output=None, x_grad=False, **kw):
    leaves = [recon.detach().clone().requires_grad_(), x.detach().clone(),
              mu.detach().clone().requires_grad_(), logvar.detach().clone().requires_grad_()]
    if x_grad:
        leaves[1].requires_grad_()
    loss = fastvae.elbo_loss(*leaves, **kw)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    grads = {"recon": leaves[0].grad, "mu": leaves[2].grad, "logvar": leaves[3].grad}
    if x_grad:
        grads["x"] = leaves[1].grad
    return loss, grads


def assert_matches(loss, grads, ref_loss, ref_grads, inputs, *, rtol=1e-5, grad_rtol=1e-5,
                   grad_atol=None):
    """Loss and gradients against the float64 oracle. Gradients: elementwise ``grad_rtol``, with an
    absolute floor of ``grad_atol`` (default: ``grad_rtol`` x the largest gradient, for elements
    that cancel to about 0 in fp32)."""
    recon, x, mu, logvar = inputs
    assert loss.dtype == (torch.float64 if recon.dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=rtol, atol=rtol)
    for name, g in grads.items():
        ref = ref_grads[name]
        src = {"recon": recon, "x": x, "mu": mu, "logvar": logvar}[name]
        assert g.dtype == src.dtype and g.shape == src.shape, name
        atol = grad_atol if grad_atol is not None else grad_rtol * (ref.abs().max().item() or 1.0)
        torch.testing.assert_close(g.double().cpu(), ref, rtol=grad_rtol, atol=atol,
                                   msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 4.0])
def test_matches_oracle(backend_device, reduction, from_logits, beta):
    backend, device = backend_device
    inputs = make_inputs((13, 100), (13, 100), 7, from_logits=from_logits, device=device, seed=1)
    B = 13
    grad_output = (torch.randn(B) if reduction == "none" else torch.tensor(-1.7)).to(device)
    kw = dict(reduction=reduction, beta=beta, from_logits=from_logits)
    loss, grads = run(*inputs, grad_output=grad_output, x_grad=True, backend=backend, **kw)
    ref_loss, ref_grads = oracle.elbo(*inputs, grad_output=grad_output, **kw)
    assert loss.shape == ((B,) if reduction == "none" else ())
    assert_matches(loss, grads, ref_loss, ref_grads, inputs)


@pytest.mark.parametrize("recon_shape,x_shape,L", [
    ((1, 1), (1, 1), 1),                 # smallest
    ((3, 1000), (3, 1000), 5),           # N just under one 1024-wide column block
    ((5, 63), (5, 1, 7, 9), 3),          # 4-D target against flat recon, odd sizes
    ((4, 1, 7, 9), (4, 1, 7, 9), 20),    # 4-D both
    ((2, 2000), (2, 2000), 300),         # N and L above one block
    ((70, 1), (70, 1), 300),             # one pixel, wide latent: the row block is capped
])
@pytest.mark.parametrize("from_logits", [True, False])
def test_shapes(backend_device, recon_shape, x_shape, L, from_logits):
    backend, device = backend_device
    inputs = make_inputs(recon_shape, x_shape, L, from_logits=from_logits, device=device, seed=2)
    g = torch.randn(recon_shape[0]).to(device)
    loss, grads = run(*inputs, grad_output=g, x_grad=True, backend=backend, reduction="none",
                      from_logits=from_logits)
    ref_loss, ref_grads = oracle.elbo(*inputs, grad_output=g, reduction="none", from_logits=from_logits)
    assert_matches(loss, grads, ref_loss, ref_grads, inputs)


def test_extreme_logits_and_logvar(backend_device):
    backend, device = backend_device
    B, N, L = 6, 40, 8
    g = torch.Generator().manual_seed(3)
    recon = torch.randn(B, N, generator=g) * 50
    recon[0] = 1e4
    recon[1] = -1e4
    recon[2, ::2] = 1e4
    recon[2, 1::2] = -1e4
    x = torch.rand(B, N, generator=g)
    x[:3, :10] = 0.0
    x[:3, 10:20] = 1.0
    mu = torch.randn(B, L, generator=g) * 100
    logvar = torch.empty(B, L).uniform_(-30, 30, generator=g)
    logvar[0] = 30.0
    logvar[1] = -30.0
    inputs = [t.to(device) for t in (recon, x, mu, logvar)]
    go = torch.rand(B).to(device) + 0.5
    for reduction in REDUCTIONS:
        gout = go if reduction == "none" else go[0]
        loss, grads = run(*inputs, grad_output=gout, x_grad=True, backend=backend, reduction=reduction)
        assert torch.isfinite(loss).all()
        assert all(torch.isfinite(v).all() for v in grads.values())
        ref_loss, ref_grads = oracle.elbo(*inputs, grad_output=gout, reduction=reduction)
        # d logvar reaches 0.5 e^30 ~ 5e12: every element is checked relative to itself, with an
        # absolute floor (1e-5, grad_output <= 1.5) only for values that cancel to about 0
        assert_matches(loss, grads, ref_loss, ref_grads, inputs, grad_atol=1e-5)


def test_probabilities_exactly_zero_and_one(backend_device):
    backend, device = backend_device
    # every combination of p in {0, 1, interior} and t in {0, 1, interior}
    p = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.3, 0.3, 0.3]).repeat(4, 1)
    t = torch.tensor([0.0, 1.0, 0.25, 0.0, 1.0, 0.25, 0.0, 1.0, 0.25]).repeat(4, 1)
    mu, logvar = torch.randn(4, 3), torch.randn(4, 3)
    inputs = [v.to(device) for v in (p, t, mu, logvar)]
    go = torch.tensor([1.0, -2.0, 0.5, 3.0]).to(device)
    loss, grads = run(*inputs, grad_output=go, x_grad=True, backend=backend, reduction="none",
                      from_logits=False)
    ref_loss, ref_grads = oracle.elbo(*inputs, grad_output=go, reduction="none", from_logits=False)
    assert_matches(loss, grads, ref_loss, ref_grads, inputs)
    # and exactly F.binary_cross_entropy's value, clamp at -100 included
    bce = F.binary_cross_entropy(p, t, reduction="none").sum(1)
    kl = 0.5 * (mu * mu + logvar.exp() - 1 - logvar).sum(1)
    torch.testing.assert_close(loss.cpu(), bce + kl, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("from_logits", [True, False])
def test_low_precision_inputs(backend_device, dtype, from_logits):
    backend, device = backend_device
    # logits of scale 2: probabilities stay inside (0, 1) in fp16, so d recon fits in its range
    inputs = make_inputs((9, 200), (9, 200), 20, from_logits=from_logits, device=device, dtype=dtype,
                         seed=4, logit_scale=2.0)
    # unit roundoff u: one rounding to nearest is off by at most u relative (fp16 subnormals: half
    # their spacing absolute); the gradient math itself runs in fp32, ~1e-6 relative
    u = torch.finfo(dtype).eps / 2
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        u = torch.finfo(dtype).eps  # Triton's interpreter rounds to bf16 by truncation: 1 ulp
    sub = torch.finfo(dtype).tiny * torch.finfo(dtype).eps / 2
    # grad_output 1: each gradient is rounded once to the input dtype. grad_output 0.75: the
    # single-pass kernel rounds the gradient when it writes it in the forward and again after
    # scaling it in the backward: two roundings, 2u.
    for go, roundings in ((1.0, 1), (0.75, 2)):
        go = torch.tensor(go).to(device)
        loss, grads = run(*inputs, grad_output=go, backend=backend, reduction="sum", from_logits=from_logits)
        assert loss.dtype == torch.float32
        ref_loss, ref_grads = oracle.elbo(*inputs, grad_output=go, reduction="sum", from_logits=from_logits)
        # the loss is accumulated in fp32 from the exact low-precision values: fp32-accurate
        torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-5, atol=1e-5)
        for name, g in grads.items():
            assert g.dtype == dtype
            torch.testing.assert_close(g.double().cpu(), ref_grads[name], rtol=roundings * u + 1e-6,
                                       atol=roundings * sub, msg=lambda m: f"grad {name}, {roundings} rounding(s): {m}")


def test_uint8_targets(backend_device):
    backend, device = backend_device
    inputs = make_inputs((6, 1, 5, 7), (6, 1, 5, 7), 4, from_logits=True, device=device,
                         x_dtype=torch.uint8, seed=5)
    for from_logits in (True, False):
        if not from_logits:
            inputs[0] = torch.sigmoid(inputs[0])
        loss, grads = run(*inputs, backend=backend, reduction="batchmean", from_logits=from_logits)
        ref_loss, ref_grads = oracle.elbo(*inputs, reduction="batchmean", from_logits=from_logits)
        assert_matches(loss, grads, ref_loss, ref_grads, inputs)


def test_non_contiguous_inputs_and_no_writes(backend_device):
    backend, device = backend_device
    g = torch.Generator().manual_seed(6)
    B, N, L = 8, 50, 6
    recon_full = torch.randn(B, 2 * N, generator=g)                         # recon: column stride 2
    x_t = torch.rand(N, B, generator=g)                                     # x: transposed
    h = torch.randn(B, 2 * L, generator=g)                                  # mu, logvar: row stride 2L
    x4_full = torch.rand(B, 10, 5, generator=g)                             # x: 4-D, not viewable
    # the strided views are made on the device itself: .to(device) of a view would copy it dense
    for x_view in (lambda: x_t.to(device).t(), lambda: x4_full.to(device).transpose(1, 2).unsqueeze(1)):
        inputs = [(recon_full.to(device) * 2)[:, ::2], x_view(), *h.to(device).chunk(2, dim=1)]
        assert not inputs[0].is_contiguous() and not inputs[1].is_contiguous() and not inputs[2].is_contiguous()
        before = [t.clone() for t in inputs]
        go = torch.randn(B).to(device)
        loss, grads = run(*inputs, grad_output=go, x_grad=True, backend=backend, reduction="none")
        ref_loss, ref_grads = oracle.elbo(*inputs, grad_output=go, reduction="none")
        assert_matches(loss, grads, ref_loss, ref_grads, inputs)
        for a, b in zip(inputs, before):
            assert torch.equal(a, b)


def test_inputs_not_written_and_deterministic(backend_device):
    backend, device = backend_device
    inputs = make_inputs((64, 784), (64, 784), 20, from_logits=True, device=device, seed=7)
    for t in (inputs[0], inputs[2], inputs[3]):
        t.requires_grad_()
    kept = [t.detach().clone() for t in inputs]
    results = []
    for _ in range(2):
        loss = fastvae.elbo_loss(*inputs, backend=backend)
        grads = torch.autograd.grad(loss, [inputs[0], inputs[2], inputs[3]])
        results.append((loss, *grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)  # bitwise reproducible: no atomics
    for a, b in zip(inputs, kept):
        assert torch.equal(a.detach(), b)


def test_matches_seed_loss_and_drop_in(backend_device):
    """FusedELBO() on logits equals the seed's sigmoid + BCE + KL; FusedELBO(from_logits=False)
    is the drop-in for PyTorch's VAE example loss_function."""
    backend, device = backend_device
    recon, x, mu, logvar = make_inputs((16, 784), (16, 1, 28, 28), 20, from_logits=True, device=device,
                                       seed=8, logit_scale=2.0)

    def value_and_grads(loss_fn, recon, x, mu, logvar):
        leaves = [t.detach().clone().requires_grad_() for t in (recon, mu, logvar)]
        loss = loss_fn(leaves[0], x, leaves[1], leaves[2])
        return (loss, *torch.autograd.grad(loss, leaves))

    def assert_same(ours, ref):
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-3 if a.dim() == 0 else 1e-6)

    assert_same(value_and_grads(fastvae.FusedELBO(backend=backend), recon, x, mu, logvar),
                value_and_grads(eager_elbo, recon, x, mu, logvar))

    def loss_function(recon_x, x, mu, logvar):  # PyTorch's examples/vae/main.py
        BCE = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
        KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return BCE + KLD

    p = torch.sigmoid(recon)
    assert_same(value_and_grads(fastvae.FusedELBO(from_logits=False, backend=backend), p, x, mu, logvar),
                value_and_grads(loss_function, p, x, mu, logvar))


@pytest.mark.parametrize("bad", [
    dict(recon=(4, 10), x=(4, 11), mu=(4, 3), logvar=(4, 3)),
    dict(recon=(4, 10), x=(5, 8), mu=(4, 3), logvar=(4, 3)),
    dict(recon=(4, 10), x=(4, 10), mu=(4, 3), logvar=(4, 2)),
    dict(recon=(4, 10), x=(4, 10), mu=(3, 3), logvar=(3, 3)),
    dict(recon=(4, 10), x=(4, 10), mu=(12,), logvar=(12,)),
])
def test_shape_mismatch_raises(backend_device, bad):
    backend, device = backend_device
    t = {k: torch.rand(v, device=device) for k, v in bad.items()}
    with pytest.raises(ValueError) as info:
        fastvae.elbo_loss(t["recon"], t["x"], t["mu"], t["logvar"], backend=backend)
    for shape in bad.values():
        assert str(shape) in str(info.value)


def test_bad_arguments_raise():
    r, x, m, v = torch.rand(2, 4), torch.rand(2, 4), torch.rand(2, 3), torch.rand(2, 3)
    with pytest.raises(ValueError, match="reduction"):
        fastvae.elbo_loss(r, x, m, v, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        fastvae.elbo_loss(r, x, m, v, backend="cuda")
    with pytest.raises(ValueError, match="reduction"):
        fastvae.FusedELBO(reduction="max")
    with pytest.raises(TypeError, match="x must be floating point"):
        fastvae.elbo_loss(r, torch.ones(2, 4, dtype=torch.int64), m, v)
    with pytest.raises(TypeError, match="recon"):
        fastvae.elbo_loss(torch.ones(2, 4, dtype=torch.int32), x, m, v)
    with pytest.raises(ValueError, match="non-empty"):
        fastvae.elbo_loss(torch.rand(0, 4), torch.rand(0, 4), torch.rand(0, 3), torch.rand(0, 3))


@pytest.mark.parametrize("beta", [-1.0, math.nan, math.inf])
def test_a_cpu_beta_tensor_is_checked_like_a_number(beta):
    r, x, m, v = torch.rand(2, 4), torch.rand(2, 4), torch.rand(2, 3), torch.rand(2, 3)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        fastvae.elbo_loss(r, x, m, v, beta=beta)
    with pytest.raises(ValueError, match=f"beta must be finite and >= 0, got a tensor holding {beta!r}"):
        fastvae.elbo_loss(r, x, m, v, beta=torch.tensor(beta))
    with pytest.raises(ValueError, match="beta must be finite and >= 0"):
        fastvae.FusedELBO(beta=torch.tensor(beta))
    # zero and positive tensors pass, and weigh the KL as the float64 oracle does
    for ok in (0.0, 2.5):
        torch.testing.assert_close(fastvae.elbo_loss(r, x, m, v, beta=torch.tensor(ok)).double(),
                                   oracle.elbo(r, x, m, v, beta=ok)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta=math.nan), "beta must be a finite number >= 0"),
    (dict(free_bits=-1), "free_bits must be a finite number >= 0"),
    (dict(likelihood="gaussian", sigma=0), "sigma must be a positive finite number"),
    (dict(likelihood="gaussian", sigma=math.nan), "sigma must be a positive finite number"),
    (dict(sigma=0.5), "sigma applies to likelihood='gaussian' only"),
    (dict(likelihood="gaussian", sigma=torch.ones(3, dtype=torch.int64)), "sigma must be a floating-point"),
])
def test_fused_elbo_checks_every_argument_at_construction(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastvae.FusedELBO(**kwargs)


def test_float64_fallback_gradcheck():
    g = torch.Generator().manual_seed(9)
    B, N, L = 3, 5, 2
    for from_logits in (True, False):
        s = torch.randn(B, N, generator=g, dtype=torch.float64)
        recon = (s if from_logits else torch.sigmoid(s).clamp(0.05, 0.95)).requires_grad_()
        x = torch.rand(B, N, generator=g, dtype=torch.float64).requires_grad_()
        mu = torch.randn(B, L, generator=g, dtype=torch.float64).requires_grad_()
        logvar = torch.randn(B, L, generator=g, dtype=torch.float64).requires_grad_()
        for reduction in REDUCTIONS:
            def f(r, t, m, v):
                return fastvae.elbo_loss(r, t, m, v, reduction=reduction, beta=0.7,
                                         from_logits=from_logits, backend="torch")
            assert torch.autograd.gradcheck(f, (recon, x, mu, logvar))
            assert f(recon, x, mu, logvar).dtype == torch.float64


def test_backend_selection(monkeypatch):
    r, x, m, v = torch.rand(2, 4), torch.rand(2, 4), torch.rand(2, 3), torch.rand(2, 3)
    assert fastvae._backend.resolve("auto", r) == "torch"
    monkeypatch.setenv("FASTVAE_BACKEND", "torch")
    assert fastvae.default_backend() == "torch"
    monkeypatch.setenv("FASTVAE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTVAE_BACKEND"):
        fastvae.elbo_loss(r, x, m, v)
    monkeypatch.delenv("FASTVAE_BACKEND")
    if fastvae.triton_available():
        with pytest.raises(TypeError, match="float64"):
            fastvae.elbo_loss(r.double(), x.double(), m.double(), v.double(), backend="triton")


def test_kernels_that_do_not_import_are_named_and_never_silent(monkeypatch):
    """Kernels that do not import (no triton, or an install without fastvae.kernels, as a failed
    editable install on a GPU machine left it): backend="triton" is an error that quotes the
    ImportError, and "auto" with CUDA tensors warns, once, that the fallback runs instead."""
    import sys
    import types
    from fastvae import _backend

    monkeypatch.setitem(sys.modules, "fastvae._triton_ops", None)
    monkeypatch.delattr(fastvae, "_triton_ops", raising=False)
    assert not _backend.triton_available()
    assert "fastvae._triton_ops" in _backend.triton_unavailable_reason()
    with pytest.raises(RuntimeError, match=r"do not import here \(ModuleNotFoundError: .*fastvae\._triton_ops"):
        _backend.resolve("triton", torch.rand(2, 4))
    monkeypatch.setattr(_backend, "_WARNED_FALLBACK_ON_CUDA", False)
    cuda_like = types.SimpleNamespace(is_cuda=True, dtype=torch.float32)  # all that "auto" reads
    with pytest.warns(RuntimeWarning, match=r"CUDA tensors, but the Triton kernels do not import"):
        assert _backend.resolve("auto", cuda_like) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.resolve("auto", cuda_like) == "torch"  # once per process
        assert _backend.resolve("auto", torch.rand(2, 4)) == "torch"  # CPU: the fallback is the plan


@pytest.mark.skipif(not fastvae.triton_available(), reason="needs triton")
def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = ("import torch, fastvae\n"
            "t = torch.rand(2, 4)\n"
            "try:\n"
            "    fastvae.elbo_loss(t, t, t[:, :3], t[:, :3], backend='triton')\n"
            "except RuntimeError as e:\n"
            "    print('ERR', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert "ERR" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


def test_autocast_safe(backend_device):
    """Under bf16 autocast the loss still accumulates in fp32 from the inputs as given."""
    backend, device = backend_device
    inputs = make_inputs((8, 300), (8, 300), 20, from_logits=True, device=device, seed=10)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        loss, grads = run(*inputs, backend=backend)
    ref_loss, ref_grads = oracle.elbo(*inputs)
    assert_matches(loss, grads, ref_loss, ref_grads, inputs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fallback_row_chunks(monkeypatch, reduction, from_logits, dtype):
    """The fallback walks large batches in row chunks; force several (and a ragged last one)."""
    monkeypatch.setattr(fastvae._fallback, "_CHUNK_ELEMENTS", 3 * 50)
    monkeypatch.setattr(fastvae._fallback, "_threads", lambda: 1)
    inputs = make_inputs((11, 50), (11, 50), 5, from_logits=from_logits, device="cpu", dtype=dtype,
                         seed=11, logit_scale=2.0)
    assert len(fastvae._fallback._row_chunks(11, 50)) == 4
    assert fastvae._fallback._row_chunks(3, 50) == [None]
    go = torch.randn(11) if reduction == "none" else torch.tensor(2.5)
    loss, grads = run(*inputs, grad_output=go, x_grad=True, backend="torch", reduction=reduction,
                      from_logits=from_logits)
    ref_loss, ref_grads = oracle.elbo(*inputs, grad_output=go, reduction=reduction, from_logits=from_logits)
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    assert_matches(loss, grads, ref_loss, ref_grads, inputs, grad_rtol=tol)


# ---- kernels v2: single pass, reductions over many partial sums, strides, rounding ---------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_many_rows_and_partial_sums(backend_device, reduction):
    """More than 1,024 rows: the per-row losses and the two-stage sum (many partial sums) add up."""
    backend, device = backend_device
    inputs = make_inputs((1500, 40), (1500, 40), 3, from_logits=True, device=device, seed=20)
    go = (torch.rand(1500) + 0.5 if reduction == "none" else torch.tensor(1.0)).to(device)
    loss, grads = run(*inputs, grad_output=go, backend=backend, reduction=reduction)
    ref_loss, ref_grads = oracle.elbo(*inputs, grad_output=go, reduction=reduction)
    assert_matches(loss, grads, ref_loss, ref_grads, inputs)


@pytest.mark.skipif(not fastvae.triton_available(), reason="needs triton")
@pytest.mark.parametrize("contiguous", [True, False], ids=["flat", "rows"])
def test_triton_second_stage_sums_every_partial(monkeypatch, contiguous):
    """Tiny blocks force many more partial sums than the second stage's block: each must count."""
    from fastvae.kernels import elbo as kernels
    if not (torch.cuda.is_available() or fastvae._backend.interpreter_enabled()):
        pytest.skip("Triton kernels need CUDA or the interpreter")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(kernels, "_FLAT_BLOCK", 16)
    monkeypatch.setattr(kernels, "_FLAT_ITERS", 1)
    monkeypatch.setattr(kernels, "_SUM_BLOCK", 4)
    monkeypatch.setattr(kernels, "_ROW_TILE", 16)
    inputs = make_inputs((37, 20), (37, 20), 3, from_logits=True, device=device, seed=21)
    if not contiguous:
        inputs[0] = inputs[0].t().contiguous().t()
    for reduction in ("sum", "batchmean"):
        loss, grads = run(*inputs, grad_output=torch.tensor(0.5).to(device), backend="triton",
                          reduction=reduction)
        ref_loss, ref_grads = oracle.elbo(*inputs, grad_output=torch.tensor(0.5), reduction=reduction)
        assert_matches(loss, grads, ref_loss, ref_grads, inputs)


def test_mu_and_logvar_with_different_strides(backend_device):
    """mu a row-strided view, logvar a transposed copy: swapping their strides would be caught."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(22)
    B, N, L = 9, 30, 5
    recon, x = torch.randn(B, N, generator=g).to(device), torch.rand(B, N, generator=g).to(device)
    mu = torch.randn(B, 3 * L, generator=g).to(device)[:, 1:1 + L]          # strides (3L, 1)
    logvar = torch.randn(L, B, generator=g).to(device).t()                    # strides (1, B)
    assert mu.stride() != logvar.stride()
    for reduction in ("sum", "none"):
        go = torch.randn(B).to(device) if reduction == "none" else torch.tensor(1.3).to(device)
        loss, grads = run(recon, x, mu, logvar, grad_output=go, backend=backend, reduction=reduction)
        ref_loss, ref_grads = oracle.elbo(recon, x, mu, logvar, grad_output=go, reduction=reduction)
        assert_matches(loss, grads, ref_loss, ref_grads, (recon, x, mu, logvar))


def test_per_row_grad_output_partly_one(backend_device):
    """reduction="none": rows whose grad_output is 1 keep the forward's gradients, the others are
    scaled (the backward skips work only where every value it owns is 1)."""
    backend, device = backend_device
    B = 300
    inputs = make_inputs((B, 50), (B, 50), 4, from_logits=True, device=device, seed=23)
    go = torch.ones(B)
    go[150:] = torch.linspace(-2, 2, B - 150)
    go[7] = 3.0
    go = go.to(device)
    loss, grads = run(*inputs, grad_output=go, x_grad=True, backend=backend, reduction="none")
    ref_loss, ref_grads = oracle.elbo(*inputs, grad_output=go, reduction="none")
    assert_matches(loss, grads, ref_loss, ref_grads, inputs)


def test_grad_output_nan_propagates(backend_device):
    backend, device = backend_device
    inputs = make_inputs((5, 20), (5, 20), 3, from_logits=True, device=device, seed=24)
    _, grads = run(*inputs, grad_output=torch.tensor(float("nan")).to(device), backend=backend)
    assert all(torch.isnan(g).all() for g in grads.values())


@pytest.mark.skipif(not fastvae.triton_available(), reason="needs triton")
def test_triton_no_gradient_work_without_grad(monkeypatch):
    """Under torch.no_grad (or with no input requiring grad) the forward writes no gradient."""
    from fastvae.kernels import elbo as kernels
    if not (torch.cuda.is_available() or fastvae._backend.interpreter_enabled()):
        pytest.skip("Triton kernels need CUDA or the interpreter")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seen = []
    real = kernels.elbo_forward

    def spy(kernel_launch, recon, x, mu, logvar, sigma, cfg, scratch):
        out = real(kernel_launch, recon, x, mu, logvar, sigma, cfg, scratch)
        seen.append((cfg.grad, cfg.x_grad, [0 if t is None else t.numel() for t in out[1:6]]))  # d recon..d logvar
        return out

    monkeypatch.setattr(kernels, "elbo_forward", spy)
    r, x, m, v = make_inputs((4, 10), (4, 10), 3, from_logits=True, device=device, seed=25)
    r.requires_grad_()
    with torch.no_grad():
        fastvae.elbo_loss(r, x, m, v, backend="triton")
    fastvae.elbo_loss(r.detach(), x, m, v, backend="triton")
    fastvae.elbo_loss(r, x, m, v, backend="triton")
    fastvae.elbo_loss(r, x.clone().requires_grad_(), m, v, backend="triton")
    assert seen == [(False, False, [0, 0, 0, 0, 0]), (False, False, [0, 0, 0, 0, 0]),
                    (True, False, [40, 0, 0, 12, 12]), (True, True, [40, 40, 0, 12, 12])]


def test_eager_calls_skip_the_op_dispatch_and_tracers_record_the_ops(backend_device):
    """The Triton path: an eager call is an autograd.Function that launches the kernels itself
    (the operator dispatch cost more host time than the kernels); under a tracer (make_fx here,
    torch.compile in test_compile) the registered ops fastvae::elbo / fastvae::reparameterize run,
    so the graph holds them, with the same values."""
    from torch.fx.experimental.proxy_tensor import make_fx

    backend, device = backend_device
    if backend != "triton":
        pytest.skip("the Triton path")
    r, x, m, v = make_inputs((4, 10), (4, 10), 3, from_logits=True, device=device, seed=27)
    leaves = [t.detach().clone().requires_grad_() for t in (r, m, v)]
    loss = fastvae.elbo_loss(leaves[0], x, leaves[1], leaves[2], backend="triton")
    # the loss is the Function's own output: no select node between it and the op
    assert loss.grad_fn.name() == "_ELBOBackward"
    z = fastvae.reparameterize(leaves[1], leaves[2], backend="triton")
    # [B, L] inputs go in as they are: no view nodes around the op (each costs engine time)
    assert type(z.grad_fn).__name__ == "_ReparameterizeBackward"
    assert [type(n).__name__ for n, _ in z.grad_fn.next_functions[:2]] == ["AccumulateGrad"] * 2
    z3 = fastvae.reparameterize(leaves[1][None], leaves[2][None], backend="triton")
    assert type(z3.grad_fn.next_functions[0][0]).__name__ == "_ReparameterizeBackward"
    assert z3.shape == (1, 4, 3)

    def f(r, x, m, v):
        eps = torch.ones_like(m)
        return fastvae.elbo_loss(r, x, m, v, backend="triton"), fastvae.reparameterize(m, v, eps=eps, backend="triton")

    # a tensor subclass (its own dispatch must see the op) takes the registered op too
    class Sub(torch.Tensor):
        pass

    sub = leaves[0].detach().clone().as_subclass(Sub).requires_grad_()
    loss_sub = fastvae.elbo_loss(sub, x, leaves[1], leaves[2], backend="triton")
    node = loss_sub.grad_fn
    while node.name() in ("AliasBackward0", "SelectBackward0"):
        node = node.next_functions[0][0]
    assert node.name() != "_ELBOBackward"
    torch.testing.assert_close(loss_sub.as_subclass(torch.Tensor), loss.detach(), rtol=0, atol=0)

    graph = make_fx(f)(r, x, m, v)
    targets = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert {"fastvae.elbo.default", "fastvae.reparameterize.default"} <= targets, targets
    for a, b in zip(graph(r, x, m, v), f(r, x, m, v)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("path", ["eager", "ops"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_fills_no_zero_gradients(backend_device, path, reduction, monkeypatch):
    """A backward moves no bytes it does not need: autograd, left to its default, hands a backward
    a zero-filled tensor for each output that got no gradient, and the Triton op's outputs
    include its [B, N] gradient buffers (a memset as large as recon per step). Every zero-fill
    over the backward is recorded by the profiler; none may be larger than the loss's own
    gradient ([4] or [4, B])."""
    from torch.profiler import ProfilerActivity, profile

    backend, device = backend_device
    if path == "ops":
        if backend != "triton":
            pytest.skip("the registered op is the Triton path's")
        from fastvae import _triton_ops
        monkeypatch.setattr(_triton_ops, "_eager", lambda *tensors: False)
    B, N, L = 6, 50, 5  # every buffer ([B, N], [B, L]) larger than the loss gradient [4, B]
    r, x, m, v = make_inputs((B, N), (B, N), L, from_logits=True, device=device, seed=28)
    leaves = [t.detach().clone().requires_grad_() for t in (r, x, m, v)]
    out = fastvae.elbo_loss(*leaves, backend=backend, reduction=reduction, return_components=True)
    total = out.loss.sum() + 0.5 * out.kl.sum()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        total.backward()
    fills = [(e.name, e.input_shapes[0]) for e in prof.events()
             if e.name in ("aten::zero_", "aten::fill_") and e.input_shapes and e.input_shapes[0]]
    big = [(name, shape) for name, shape in fills if torch.Size(shape).numel() > 4 * B]
    assert not big, big
    assert leaves[0].grad is not None and leaves[1].grad is not None


@pytest.mark.skipif(not fastvae.triton_available(), reason="needs triton")
def test_triton_second_backward_is_a_clear_error():
    if not (torch.cuda.is_available() or fastvae._backend.interpreter_enabled()):
        pytest.skip("Triton kernels need CUDA or the interpreter")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    r, x, m, v = make_inputs((4, 10), (4, 10), 3, from_logits=True, device=device, seed=26)
    r.requires_grad_()
    loss = fastvae.elbo_loss(r, x, m, v, backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_confident_logits_do_not_cancel(backend_device, reduction):
    """s = +-15 ... +-40 with x at 0 or 1 on the confident side: each pixel's loss is a tiny
    log(1 + e^-|s|), which a sum of softplus minus a dot product cancels to 0 in fp32."""
    backend, device = backend_device
    mags = torch.tensor([15.0, 17.0, 20.0, 25.0, 30.0, 40.0])
    B, N = 8, 784
    s = mags.repeat_interleave(2).repeat(N // 12 + 1)[:N].repeat(B, 1)
    sign = torch.ones(B, N)
    sign[:, 1::2] = -1.0
    sign[1::2] *= -1.0
    recon = s * sign
    x = (recon > 0).float()                                    # confident and right
    recon[B - 1] = 15.0                                        # the case: 2.398e-4
    x[B - 1] = 1.0
    mu, logvar = torch.zeros(B, 3), torch.zeros(B, 3)          # KL exactly 0
    inputs = [t.to(device) for t in (recon, x, mu, logvar)]
    loss, grads = run(*inputs, backend=backend, reduction=reduction)
    ref_loss, ref_grads = oracle.elbo(*inputs, reduction=reduction)
    assert ref_loss.min() > 0
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-5, atol=0)
    if reduction == "none":
        want = 784 * torch.log1p(torch.exp(torch.tensor(-15.0, dtype=torch.float64)))  # 2.398e-4
        torch.testing.assert_close(loss[B - 1].double().cpu(), want, rtol=1e-5, atol=0)
    # d recon = sigmoid(s) - x, relative to itself: -sigmoid(-s) where x = 1, sigmoid(s) where x = 0
    # (the float64 oracle's autograd cancels 1 - 1 - 4e-18 to 0 at s = 40, so it is written out)
    s64 = recon.double()
    want = torch.where(x == 1, -torch.sigmoid(-s64), torch.sigmoid(s64))
    if reduction == "batchmean":
        want = want / B
    torch.testing.assert_close(grads["recon"].double().cpu(), want, rtol=1e-5, atol=0)
    assert not grads["mu"].any() and not grads["logvar"].any()
