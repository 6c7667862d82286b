"""Issue 9: every likelihood, reduction, from_logits and dtype, the components, sigma, beta tensors,
free bits, invalid probabilities and misuse, against the float64 oracle on every backend (the
fallback, and the Triton kernels on CUDA or under the interpreter)."""
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastvae
import oracle

REDUCTIONS = ["sum", "batchmean", "none"]
# (likelihood, from_logits, sigma): every decoder likelihood of elbo_loss
CASES = [
    ("bernoulli", True, None),
    ("bernoulli", False, None),
    ("gaussian", True, None),          # sigma = 1
    ("gaussian", True, 0.3),
    ("mse", True, None),
    ("continuous_bernoulli", True, None),
]
CASE_IDS = ["bernoulli-logits", "bernoulli-probs", "gaussian", "gaussian-s0.3", "mse", "cb"]


def make(likelihood, from_logits, shape, L, *, device, dtype=torch.float32, seed=0, scale=3.0):
    """recon (logits, probabilities or means), x in [0, 1], mu, logvar."""
    g = torch.Generator().manual_seed(seed)
    B = shape[0]
    s = torch.randn(shape, generator=g) * scale
    if likelihood == "bernoulli" and not from_logits:
        recon = torch.sigmoid(s)
    elif likelihood in ("gaussian", "mse"):
        recon = torch.rand(shape, generator=g)
    else:
        recon = s
    x = torch.rand(shape, generator=g)
    mu = torch.randn(B, L, generator=g)
    logvar = torch.randn(B, L, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (recon, x, mu, logvar)]


def call(recon, x, mu, logvar, *, grad=("recon", "x", "mu", "logvar"), sigma=None, beta=1.0, **kw):
    """fastvae on fresh leaves: (result, leaves). Leaves named in ``grad`` require grad; sigma and
    beta tensors are leaves too (requiring grad when named)."""
    leaves = {"recon": recon, "x": x, "mu": mu, "logvar": logvar}
    if isinstance(sigma, torch.Tensor):
        leaves["sigma"] = sigma
    if isinstance(beta, torch.Tensor):
        leaves["beta"] = beta
    leaves = {k: v.detach().clone().requires_grad_(k in grad) for k, v in leaves.items()}
    out = fastvae.elbo_loss(leaves["recon"], leaves["x"], leaves["mu"], leaves["logvar"],
                            sigma=leaves.get("sigma", sigma), beta=leaves.get("beta", beta), **kw)
    return out, leaves


def fast_grads(objective, leaves):
    names = [k for k, v in leaves.items() if v.requires_grad]
    return dict(zip(names, torch.autograd.grad(objective, [leaves[k] for k in names])))


def check_grads(got, ref, leaves, *, rtol=1e-5, atol=None):
    """Every gradient against the oracle's, each in its input's dtype and shape; elementwise rtol
    with an absolute floor (default: rtol x the largest gradient, for values that cancel to ~0)."""
    assert got, "no gradient checked"
    for name, g in got.items():
        src = leaves[name]
        assert g.dtype == src.dtype and g.shape == src.shape, name
        r = ref[name]
        floor = atol if atol is not None else rtol * (r.abs().max().item() or 1.0)
        torch.testing.assert_close(g.double().cpu(), r.cpu(), rtol=rtol, atol=floor,
                                   msg=lambda m: f"grad {name}: {m}")


def grad_output_for(reduction, device, B, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    if reduction == "none":
        return (torch.randn(B, generator=g) + 0.3).to(device, dtype)
    return torch.tensor(-1.7, dtype=dtype).to(device)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_likelihood_matches_oracle(backend_device, case, reduction):
    backend, device = backend_device
    likelihood, from_logits, sigma = case
    B = 11
    inputs = make(likelihood, from_logits, (B, 90), 7, device=device, seed=1)
    kw = dict(reduction=reduction, beta=0.7, likelihood=likelihood, sigma=sigma, from_logits=from_logits)
    loss, leaves = call(*inputs, backend=backend, **kw)
    assert loss.dtype == torch.float32 and loss.shape == ((B,) if reduction == "none" else ())
    go = grad_output_for(reduction, device, B, seed=1)
    got = fast_grads((loss * go).sum(), leaves)
    ref_leaves, ref = oracle.terms(*inputs, **kw)
    torch.testing.assert_close(loss.double().cpu(), ref["loss"].detach().cpu(), rtol=1e-5, atol=1e-5)
    check_grads(got, oracle.grads((ref["loss"] * go.double().cpu()).sum(), ref_leaves), leaves)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float64_fallback_matches_oracle(case, reduction):
    likelihood, from_logits, sigma = case
    B = 9
    inputs = make(likelihood, from_logits, (B, 70), 5, device="cpu", dtype=torch.float64, seed=2)
    kw = dict(reduction=reduction, beta=1.3, likelihood=likelihood, sigma=sigma, from_logits=from_logits)
    loss, leaves = call(*inputs, backend="torch", **kw)
    assert loss.dtype == torch.float64
    go = grad_output_for(reduction, "cpu", B, torch.float64, seed=2)
    got = fast_grads((loss * go).sum(), leaves)
    ref_leaves, ref = oracle.terms(*inputs, **kw)
    # float64 arithmetic; the continuous Bernoulli's series near lam = 1/2 is good to 1e-8
    tol = 1e-7 if likelihood == "continuous_bernoulli" else 1e-10
    torch.testing.assert_close(loss, ref["loss"].detach(), rtol=tol, atol=tol)
    check_grads(got, oracle.grads((ref["loss"] * go).sum(), ref_leaves), leaves, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_low_precision_inputs(backend_device, case, dtype):
    """bf16/fp16 inputs: computed in fp32 from the rounded inputs, each gradient rounded once (or
    twice with grad_output != 1: written in the forward, scaled in the backward)."""
    backend, device = backend_device
    likelihood, from_logits, sigma = case
    inputs = make(likelihood, from_logits, (8, 150), 12, device=device, dtype=dtype, seed=3, scale=2.0)
    kw = dict(reduction="sum", likelihood=likelihood, sigma=sigma, from_logits=from_logits)
    u = torch.finfo(dtype).eps / 2
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        u = torch.finfo(dtype).eps  # Triton's interpreter rounds to bf16 by truncation: 1 ulp
    sub = torch.finfo(dtype).tiny * torch.finfo(dtype).eps / 2
    ref_leaves, ref = oracle.terms(*inputs, **kw)
    for go, roundings in ((1.0, 1), (0.75, 2)):
        loss, leaves = call(*inputs, grad=("recon", "mu", "logvar"), backend=backend, **kw)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss.double().cpu(), ref["loss"].detach().cpu(), rtol=1e-5, atol=1e-5)
        got = fast_grads(loss * go, leaves)
        want = oracle.grads(ref["loss"] * go, ref_leaves)
        for name, g in got.items():
            assert g.dtype == dtype
            r = want[name]
            # the rounding(s) to the input dtype, over the fp32 arithmetic's ~1e-6 of the largest
            torch.testing.assert_close(g.double().cpu(), r.cpu(), rtol=roundings * u,
                                       atol=roundings * sub + 1e-6 * r.abs().max().item(),
                                       msg=lambda m: f"grad {name}, {roundings} rounding(s): {m}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_components(backend_device, case, reduction):
    """return_components: (loss, reconstruction, kl) each reduced like the loss, with gradients
    of any combination of them (here reconstruction + 0.3 kl, and the three together)."""
    backend, device = backend_device
    likelihood, from_logits, sigma = case
    B = 7
    inputs = make(likelihood, from_logits, (B, 40), 6, device=device, seed=4)
    kw = dict(reduction=reduction, beta=2.5, likelihood=likelihood, sigma=sigma, from_logits=from_logits)
    ref_leaves, ref = oracle.terms(*inputs, **kw)
    comp, leaves = call(*inputs, backend=backend, return_components=True, **kw)
    assert isinstance(comp, fastvae.functional.ELBOComponents)
    for name in ("loss", "reconstruction", "kl"):
        got = getattr(comp, name)
        assert got.shape == ref[name].shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double().cpu(), ref[name].detach().cpu(), rtol=1e-5, atol=1e-5)
    go = grad_output_for(reduction, device, B, seed=4)
    go64 = go.double().cpu()
    for weights in ((0.0, 1.0, 0.3), (0.5, -1.0, 2.0)):
        comp, leaves = call(*inputs, backend=backend, return_components=True, **kw)
        obj = sum(w * (c * go).sum() for w, c in zip(weights, comp))
        got = fast_grads(obj, leaves)
        want = oracle.grads(sum(w * (ref[n] * go64).sum() for w, n in
                                zip(weights, ("loss", "reconstruction", "kl"))), ref_leaves)
        check_grads(got, want, leaves)


@pytest.mark.parametrize("sigma_kind", ["pixel", "sample", "learned", "pixel-2d", "sample-2d"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_sigma_tensors(backend_device, sigma_kind, reduction):
    """sigma per pixel, per sample [B, 1, ...] and 0-dim learned (sigma-VAE), each requiring grad,
    on a 4-D recon [B, 1, 28, 28] and on a flat one [B, N] (per pixel [N], per sample [B, 1])."""
    backend, device = backend_device
    B = 5
    four_d = not sigma_kind.endswith("2d")
    shape = (B, 1, 28, 28) if four_d else (B, 784)
    inputs = make("gaussian", True, shape, 8, device=device, seed=5)
    g = torch.Generator().manual_seed(6)
    sigma = {"pixel": lambda: 0.2 + torch.rand(1, 28, 28, generator=g),
             "sample": lambda: 0.2 + torch.rand(B, 1, 1, 1, generator=g),
             "learned": lambda: torch.tensor(0.45),
             "pixel-2d": lambda: 0.2 + torch.rand(784, generator=g),
             "sample-2d": lambda: 0.2 + torch.rand(B, 1, generator=g)}[sigma_kind]().to(device)
    kw = dict(reduction=reduction, beta=0.8, likelihood="gaussian", sigma=sigma)
    loss, leaves = call(*inputs, grad=("recon", "x", "mu", "logvar", "sigma"), backend=backend, **kw)
    go = grad_output_for(reduction, device, B, seed=5)
    got = fast_grads((loss * go).sum(), leaves)
    assert got["sigma"].shape == sigma.shape
    ref_leaves, ref = oracle.terms(*inputs, **kw)
    torch.testing.assert_close(loss.double().cpu(), ref["loss"].detach().cpu(), rtol=1e-5, atol=1e-4)
    check_grads(got, oracle.grads((ref["loss"] * go.double().cpu()).sum(), ref_leaves), leaves)
    # a tensor sigma equal to a float sigma gives the float's loss (the two code paths agree)
    if sigma_kind == "learned":
        loss_f, _ = call(*inputs, backend=backend, reduction=reduction, beta=0.8,
                         likelihood="gaussian", sigma=0.45)
        torch.testing.assert_close(loss_f, loss, rtol=1e-5, atol=1e-4)


def test_sigma_matches_torch_normal(backend_device):
    """The Gaussian is -Normal(recon, sigma).log_prob(x), its constant included."""
    backend, device = backend_device
    recon, x, mu, logvar = make("gaussian", True, (6, 50), 4, device=device, seed=7)
    for sigma in (0.05, 1.0, 3.0, torch.full((6, 1), 0.4, device=device)):
        loss = fastvae.elbo_loss(recon, x, mu, logvar, likelihood="gaussian", sigma=sigma,
                                 reduction="none", backend=backend)
        s64 = sigma.double() if isinstance(sigma, torch.Tensor) else sigma
        nll = -torch.distributions.Normal(recon.double(), s64).log_prob(x.double()).sum(1)
        kl = 0.5 * (mu.double() ** 2 + logvar.double().exp() - 1 - logvar.double()).sum(1)
        torch.testing.assert_close(loss.double(), nll + kl, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_beta_tensor_gets_its_gradient(backend_device, reduction):
    """A 0-dim beta that requires grad gets d beta = kl_eff reduced (free bits on here)."""
    backend, device = backend_device
    B = 6
    inputs = make("bernoulli", True, (B, 30), 5, device=device, seed=8)
    beta = torch.tensor(0.35, device=device)
    kw = dict(reduction=reduction, beta=beta, free_bits=0.6)
    loss, leaves = call(*inputs, grad=("recon", "mu", "logvar", "beta"), backend=backend, **kw)
    go = grad_output_for(reduction, device, B, seed=8)
    got = fast_grads((loss * go).sum(), leaves)
    ref_leaves, ref = oracle.terms(*inputs, **kw)
    torch.testing.assert_close(loss.double().cpu(), ref["loss"].detach().cpu(), rtol=1e-5, atol=1e-5)
    want = oracle.grads((ref["loss"] * go.double().cpu()).sum(), ref_leaves)
    check_grads(got, want, leaves)
    # d beta = sum_i go_i * kl_eff_i: the floored KL, not the true one
    torch.testing.assert_close(got["beta"].double().cpu(), (ref["kl_eff"] * go.double().cpu()).sum().detach(),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref["kl_eff"], ref["kl"])


def _free_bits_latents(B, device):
    """mu, logvar [B, 6] whose batch-mean KL per dim is (about) 0.02, 0.3, 1.1, 2.4, 0.05, 5: with
    free_bits = 0.5, dims 0, 1, 4 are below the floor and 2, 3, 5 above."""
    g = torch.Generator().manual_seed(9)
    target = torch.tensor([0.02, 0.3, 1.1, 2.4, 0.05, 5.0])
    mu = torch.sqrt(2 * target) * (1 + 0.1 * torch.randn(B, 6, generator=g))
    logvar = 0.05 * torch.randn(B, 6, generator=g)
    return mu.to(device), logvar.to(device)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[5]], ids=["bernoulli", "gaussian", "cb"])
def test_free_bits(backend_device, case, reduction):
    backend, device = backend_device
    likelihood, from_logits, sigma = case
    B = 16
    recon, x, _, _ = make(likelihood, from_logits, (B, 20), 6, device=device, seed=10)
    mu, logvar = _free_bits_latents(B, device)
    kw = dict(reduction=reduction, beta=1.5, free_bits=0.5, likelihood=likelihood, sigma=sigma,
              from_logits=from_logits)
    ref_leaves, ref = oracle.terms(recon, x, mu, logvar, **kw)
    kl_dims = 0.5 * (mu.double() ** 2 + logvar.double().exp() - 1 - logvar.double()).mean(0).cpu()
    assert ((kl_dims < 0.5).tolist() == [True, True, False, False, True, False])
    comp, leaves = call(recon, x, mu, logvar, backend=backend, return_components=True, **kw)
    for name in ("loss", "reconstruction", "kl"):
        torch.testing.assert_close(getattr(comp, name).double().cpu(), ref[name].detach().cpu(),
                                   rtol=1e-5, atol=1e-5)
    go = grad_output_for(reduction, device, B, seed=10)
    got = fast_grads((comp.loss * go).sum(), leaves)
    check_grads(got, oracle.grads((ref["loss"] * go.double().cpu()).sum(), ref_leaves), leaves)
    # the dims below the floor get no gradient from the loss; the others the plain KL's
    assert not got["mu"][:, [0, 1, 4]].any() and got["mu"][:, [2, 3, 5]].all()
    # and free_bits = 0 is the plain loss
    plain, _ = call(recon, x, mu, logvar, backend=backend, **dict(kw, free_bits=0.0))
    _, ref0 = oracle.terms(recon, x, mu, logvar, **dict(kw, free_bits=0.0))
    torch.testing.assert_close(plain.double().cpu(), ref0["loss"].detach().cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_4d", [False, True])
def test_mse_is_f_mse_loss_sum_plus_kl(backend_device, x_4d):
    backend, device = backend_device
    recon, x, mu, logvar = make("mse", True, (12, 784), 10, device=device, seed=11)
    if x_4d:
        x = x.view(12, 1, 28, 28)
    leaves = [t.detach().clone().requires_grad_() for t in (recon, mu, logvar)]
    loss = fastvae.elbo_loss(leaves[0], x, leaves[1], leaves[2], likelihood="mse", backend=backend)
    got = torch.autograd.grad(loss, leaves)
    leaves_ref = [t.detach().clone().requires_grad_() for t in (recon, mu, logvar)]
    ref = (F.mse_loss(leaves_ref[0], x.view_as(recon), reduction="sum")
           - 0.5 * torch.sum(1 + leaves_ref[2] - leaves_ref[1].pow(2) - leaves_ref[2].exp()))
    want = torch.autograd.grad(ref, leaves_ref)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_continuous_bernoulli_near_and_far_from_one_half(backend_device):
    """log C near lam = 1/2 (|s| < 1e-3, s = 0 exactly, around the series thresholds: |s| = 0.75 in
    the fallback, 1 and 1.5 in the kernel) and
    far from it (|s| = 20 ... 80): values and gradients against the oracle (torch.distributions in
    float64 up to |s| = 15, the closed form beyond)."""
    backend, device = backend_device
    near = [0.0, 1e-7, -1e-7, 1e-4, -3e-4, 9.9e-4, -1e-3, 0.5, -0.5, 0.7499999, 0.75, -0.75, 0.7500001,
            0.9, 0.999, 0.9999999, 1.0,
            -1.0, 1.0000001, 1.001, -1.001, 1.1, 2.0, -5.0]
    far = [20.0, -20.0, 25.0, 31.0, -33.0, 40.0, -50.0, 60.0, -70.0, 80.0, -80.0, 79.5]
    s = torch.tensor(near + far)
    N = s.numel()
    g = torch.Generator().manual_seed(12)
    B = 4
    recon = s.repeat(B, 1)
    x = torch.rand(B, N, generator=g)
    x[0] = 0.0
    x[1] = 1.0
    mu, logvar = torch.randn(B, 3, generator=g), torch.randn(B, 3, generator=g)
    inputs = [t.to(device) for t in (recon, x, mu, logvar)]
    kw = dict(reduction="none", likelihood="continuous_bernoulli")
    loss, leaves = call(*inputs, backend=backend, **kw)
    go = torch.tensor([1.0, -0.5, 2.0, 0.7], device=device)
    got = fast_grads((loss * go).sum(), leaves)
    ref_leaves, ref = oracle.terms(*inputs, **kw)
    assert torch.isfinite(loss).all() and all(torch.isfinite(v).all() for v in got.values())
    torch.testing.assert_close(loss.double().cpu(), ref["loss"].detach().cpu(), rtol=1e-5, atol=1e-5)
    # d recon elementwise relative to itself (fp32 arithmetic near 0: 1e-6 absolute)
    check_grads(got, oracle.grads((ref["loss"] * go.double().cpu()).sum(), ref_leaves), leaves,
                rtol=1e-5, atol=1e-6)
    # per pixel: one row, x = 0.3, against torch.distributions / the closed form directly
    xs = torch.full((1, N), 0.3, device=device)
    one = fastvae.elbo_loss(recon[:1].to(device), xs, mu[:1].to(device) * 0, mu[:1].to(device) * 0,
                            reduction="sum", likelihood="continuous_bernoulli", backend=backend)
    s64 = s.double()
    lp = torch.distributions.ContinuousBernoulli(logits=s64[:len(near)]).log_prob(torch.tensor(0.3, dtype=torch.float64))
    closed = (s64[len(near):].clamp(min=0) - 0.3 * s64[len(near):] + torch.log1p(torch.exp(-s64[len(near):].abs()))
              - oracle.cb_log_norm_closed(s64[len(near):]))
    torch.testing.assert_close(one.double().cpu(), -lp.sum() + closed.sum(), rtol=1e-6, atol=1e-5)
    if backend == "torch":  # its recompute path (a second backward of the graph): the same bits
        loss2, leaves2 = call(*inputs, backend=backend, **kw)
        first = torch.autograd.grad((loss2 * go).sum(), leaves2["recon"], retain_graph=True)[0]
        second = torch.autograd.grad((loss2 * go).sum(), leaves2["recon"])[0]
        assert torch.equal(first, second)


def test_oracle_closed_form_agrees_with_torch_distributions():
    """The oracle's two continuous-Bernoulli forms agree where both are accurate (1 <= |s| <= 15):
    value and gradient."""
    s = torch.tensor([1.0, -1.5, 3.0, -7.0, 10.0, 15.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.1, 0.9, 0.5, 0.0, 1.0, 0.3], dtype=torch.float64)
    a = torch.distributions.ContinuousBernoulli(logits=s).log_prob(t)
    b = -(s.clamp(min=0) - s * t + torch.log1p(torch.exp(-s.abs()))) + oracle.cb_log_norm_closed(s)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=0)
    ga, = torch.autograd.grad(a.sum(), s)
    gb, = torch.autograd.grad(b.sum(), s)
    torch.testing.assert_close(ga, gb, rtol=1e-7, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -0.1, float("inf")])
def test_invalid_probabilities_give_nan(backend_device, bad):
    """from_logits=False: a probability outside [0, 1] or NaN gives NaN (no error, never a finite
    loss), on both paths; the other rows are untouched."""
    backend, device = backend_device
    recon, x, mu, logvar = make("bernoulli", False, (4, 25), 3, device=device, seed=13)
    recon = recon.clone()
    recon[2, 7] = bad
    for reduction in ("sum", "batchmean"):
        loss = fastvae.elbo_loss(recon, x, mu, logvar, from_logits=False, reduction=reduction, backend=backend)
        assert torch.isnan(loss)
    rows, leaves = call(recon, x, mu, logvar, from_logits=False, reduction="none", backend=backend)
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3]]).all()
    ok = [0, 1, 3]
    ref, _ = oracle.elbo(recon[ok], x[ok], mu[ok], logvar[ok], reduction="none", from_logits=False)
    torch.testing.assert_close(rows[ok].double().cpu(), ref.cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_many_rows(backend_device, case):
    """More than 1,024 rows (many partial sums on the Triton path, several row chunks would be
    taken by the fallback at a larger width)."""
    backend, device = backend_device
    likelihood, from_logits, sigma = case
    B = 1500
    inputs = make(likelihood, from_logits, (B, 24), 3, device=device, seed=14)
    for reduction in ("sum", "none"):
        kw = dict(reduction=reduction, likelihood=likelihood, sigma=sigma, from_logits=from_logits)
        loss, leaves = call(*inputs, grad=("recon", "mu", "logvar"), backend=backend, **kw)
        go = grad_output_for(reduction, device, B, seed=14)
        got = fast_grads((loss * go).sum(), leaves)
        ref_leaves, ref = oracle.terms(*inputs, **kw)
        torch.testing.assert_close(loss.double().cpu(), ref["loss"].detach().cpu(), rtol=1e-5, atol=1e-5)
        check_grads(got, oracle.grads((ref["loss"] * go.double().cpu()).sum(), ref_leaves), leaves)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_mismatched_strides_and_no_writes(backend_device, case):
    """recon a column-strided view, x transposed, mu row-strided, logvar transposed, sigma an
    expanded per-sample view: the right element everywhere, and no input written."""
    backend, device = backend_device
    likelihood, from_logits, sigma = case
    B, N, L = 8, 30, 5
    recon, x, mu, logvar = make(likelihood, from_logits, (B, N), L, device=device, seed=15)
    recon = torch.stack([recon, recon + 1], 2).reshape(B, 2 * N)[:, ::2]
    x = x.t().contiguous().t()
    mu = torch.cat([mu, mu, mu], 1)[:, L:2 * L]
    logvar = logvar.t().contiguous().t()
    assert not (recon.is_contiguous() or x.is_contiguous() or mu.is_contiguous())
    if likelihood == "gaussian" and sigma is not None:
        sigma = (0.2 + torch.rand(B, 1, generator=torch.Generator().manual_seed(16))).to(device)
    inputs = (recon, x, mu, logvar)
    before = [t.clone() for t in inputs]
    kw = dict(reduction="none", likelihood=likelihood, sigma=sigma, from_logits=from_logits)
    grad = ("recon", "x", "mu", "logvar", "sigma")
    loss, leaves = call(*inputs, grad=grad, backend=backend, **kw)
    go = grad_output_for("none", device, B, seed=15)
    got = fast_grads((loss * go).sum(), leaves)
    ref_leaves, ref = oracle.terms(*inputs, **kw)
    torch.testing.assert_close(loss.double().cpu(), ref["loss"].detach().cpu(), rtol=1e-5, atol=1e-5)
    check_grads(got, oracle.grads((ref["loss"] * go.double().cpu()).sum(), ref_leaves), leaves)
    # the strided tensors themselves, straight into the op: nothing written
    fastvae.elbo_loss(*inputs, backend=backend, **kw).sum()
    for a, b in zip(inputs, before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_uint8_targets(backend_device, case):
    backend, device = backend_device
    likelihood, from_logits, sigma = case
    recon, _, mu, logvar = make(likelihood, from_logits, (5, 1, 6, 7), 4, device=device, seed=17)
    x = torch.randint(0, 256, (5, 1, 6, 7), generator=torch.Generator().manual_seed(18),
                      dtype=torch.uint8).to(device)
    kw = dict(reduction="batchmean", likelihood=likelihood, sigma=sigma, from_logits=from_logits)
    loss, leaves = call(recon, x, mu, logvar, grad=("recon", "mu", "logvar"), backend=backend, **kw)
    got = fast_grads(loss, leaves)
    ref_leaves, ref = oracle.terms(recon, x, mu, logvar, **kw)
    torch.testing.assert_close(loss.double().cpu(), ref["loss"].detach().cpu(), rtol=1e-5, atol=1e-5)
    check_grads(got, oracle.grads(ref["loss"], ref_leaves), leaves)


# ---- misuse ----------------------------------------------------------------------------------------

def _small(device="cpu"):
    return make("bernoulli", True, (3, 8), 2, device=device, seed=19)


def test_flags_must_be_bools(backend_device):
    backend, device = backend_device
    r, x, m, v = _small(device)
    with pytest.raises(TypeError, match="from_logits"):
        fastvae.elbo_loss(r, x, m, v, from_logits="False", backend=backend)
    with pytest.raises(TypeError, match="return_components"):
        fastvae.elbo_loss(r, x, m, v, return_components=1, backend=backend)


def test_mean_is_refused_and_points_to_batchmean(backend_device):
    backend, device = backend_device
    r, x, m, v = _small(device)
    with pytest.raises(ValueError, match="batchmean"):
        fastvae.elbo_loss(r, x, m, v, reduction="mean", backend=backend)
    with pytest.raises(ValueError, match="batchmean"):
        fastvae.FusedELBO(reduction="mean")


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli", "mse"])
def test_sigma_only_for_gaussian(backend_device, likelihood):
    backend, device = backend_device
    r, x, m, v = _small(device)
    for sigma in (0.5, torch.tensor(0.5, device=device)):
        with pytest.raises(ValueError, match="sigma"):
            fastvae.elbo_loss(r, x, m, v, likelihood=likelihood, sigma=sigma, backend=backend)


def test_swapped_arguments_warn(backend_device):
    backend, device = backend_device
    r, x, m, v = _small(device)
    x = torch.sigmoid(r).detach().requires_grad_()   # the model output, passed as x
    with pytest.warns(UserWarning, match="swapped"):
        fastvae.elbo_loss(torch.rand_like(r), x, m, v, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastvae.elbo_loss(r.requires_grad_(), x, m, v, backend=backend)  # both require grad: fine


def test_torch_func_is_refused_by_name(backend_device):
    backend, device = backend_device
    r, x, m, v = _small(device)
    with pytest.raises(RuntimeError, match="torch.func"):
        torch.func.grad(lambda rr: fastvae.elbo_loss(rr, x, m, v, backend=backend))(r)
    # reparameterize: the fallback's plain tensor ops run under torch.func (d sum(z) / d mu is
    # all ones); the Triton kernels are refused by name
    eps = torch.ones_like(m)

    def z_sum(mm):
        return fastvae.reparameterize(mm, v, eps=eps, backend=backend).sum()
    if backend == "torch":
        torch.testing.assert_close(torch.func.grad(z_sum)(m), torch.ones_like(m))
    else:
        with pytest.raises(RuntimeError, match="reparameterize's Triton kernels do not support torch.func"):
            torch.func.grad(z_sum)(m)


# ---- double backward -----------------------------------------------------------------------------

def _gradcheck_problem(case, reduction, seed):
    """(float64 leaves, f): small inputs for gradcheck (sigma as a [B, 1] tensor where the case
    has one) and elbo_loss on the fallback with beta, free bits and every component."""
    likelihood, from_logits, sigma = case
    g = torch.Generator().manual_seed(seed)
    B, N, L = 3, 4, 2
    r, x, m, v = make(likelihood, from_logits, (B, N), L, device="cpu", dtype=torch.float64, seed=seed, scale=2.0)
    if likelihood == "bernoulli" and not from_logits:
        r = r.clamp(0.05, 0.95)
    inputs = [r, x, m, v]
    if sigma is not None:
        inputs.append((0.5 + torch.rand(B, 1, generator=g, dtype=torch.float64)))
    inputs = [t.detach().requires_grad_() for t in inputs]

    def f(r, x, m, v, *sig):
        c = fastvae.elbo_loss(r, x, m, v, reduction=reduction, beta=0.7, free_bits=0.05,
                              likelihood=likelihood, sigma=sig[0] if sig else None,
                              from_logits=from_logits, return_components=True, backend="torch")
        return c.loss, c.reconstruction, c.kl

    return inputs, f


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fallback_double_backward(case, reduction):
    """The fallback's backward is differentiable: gradgradcheck in float64, every input (sigma
    tensor and free bits included), every component."""
    inputs, f = _gradcheck_problem(case, reduction, seed=20)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_triton_refuses_double_backward_by_name():
    if not fastvae.triton_available() or not (torch.cuda.is_available()
                                              or fastvae._backend.interpreter_enabled()):
        pytest.skip("Triton kernels need CUDA or the interpreter")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    r, x, m, v = [t.requires_grad_() for t in _small(device)]
    loss = fastvae.elbo_loss(r, x, m, v, backend="triton")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, r, create_graph=True)


# ---- forward-mode AD -----------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fallback_forward_mode_ad_gradcheck(case, reduction):
    """The fallback has a forward derivative (torch.autograd.forward_ad): gradcheck's
    check_forward_ad compares it with finite differences in float64, every input (sigma tensor and
    free bits included), every component."""
    inputs, f = _gradcheck_problem(case, reduction, seed=21)
    assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True, check_backward_ad=False)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_mode_ad_matches_oracle(backend_device, case, reduction):
    """Dual tensors (torch.autograd.forward_ad) in float32: on the fallback each component's
    tangent is the float64 oracle's gradient dotted with the inputs' tangents (per row for
    "none"), to the gradients' tolerance; backend="triton" refuses them by name (its kernels have
    no forward derivative), and "auto" never sends them there."""
    import torch.autograd.forward_ad as fwAD

    backend, device = backend_device
    likelihood, from_logits, sigma = case
    B = 5
    inputs = make(likelihood, from_logits, (B, 40), 3, device=device, seed=22)
    g = torch.Generator().manual_seed(22)
    tangents = [torch.randn(t.shape, generator=g).to(device) for t in inputs]
    kw = dict(reduction=reduction, beta=0.7, likelihood=likelihood, sigma=sigma, from_logits=from_logits)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(t, d) for t, d in zip(inputs, tangents)]
        if backend == "triton":
            with pytest.raises(RuntimeError, match="forward-mode AD"):
                fastvae.elbo_loss(*duals, backend="triton", **kw)
            return
        out = fastvae.elbo_loss(*duals, backend=backend, return_components=True, **kw)
        got = {name: fwAD.unpack_dual(t).tangent for name, t in zip(out._fields, out)}
        if device == "cuda":  # "auto" takes dual CUDA tensors to the fallback, not to the kernels
            auto = fastvae.elbo_loss(*duals, backend="auto", return_components=True, **kw)
            torch.testing.assert_close(fwAD.unpack_dual(auto.loss).tangent, got["loss"])
    ref_leaves, ref = oracle.terms(*inputs, **kw)
    t64 = dict(zip(("recon", "x", "mu", "logvar"), (t.detach().cpu().double() for t in tangents)))
    for name in ("loss", "reconstruction", "kl"):
        term = ref[name].reshape(-1)
        want, scale = [], []
        for i in range(term.numel()):
            d = oracle.grads(term[i], ref_leaves)
            want.append(sum((d[k] * t64[k]).sum() for k in t64))
            scale.append(sum((d[k] * t64[k]).abs().sum() for k in t64))
        want, scale = torch.stack(want), torch.stack(scale)
        assert got[name].dtype == torch.float32 and got[name].shape == out.loss.shape, name
        # each gradient to 1e-5 relative (as in the reverse-mode tests), one rounding per product
        torch.testing.assert_close(got[name].double().cpu().reshape(-1), want, rtol=1e-5,
                                   atol=1e-5 * scale.max().item(), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("formulation", ["loops", "aten"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_loss_alone_is_the_four_term_forms_loss(case, reduction, formulation, monkeypatch):
    """Without return_components the fallback's op makes the loss alone (one output): the same
    bits as the loss of return_components=True, and the same gradients, with a non-unit
    grad_output and a second backward of the graph (the recompute path)."""
    from conftest import use_formulation

    use_formulation(formulation, monkeypatch)
    likelihood, from_logits, sigma = case
    inputs = make(likelihood, from_logits, (7, 50), 4, device="cpu", seed=25)
    kw = dict(reduction=reduction, beta=0.6, likelihood=likelihood, sigma=sigma, from_logits=from_logits,
              backend="torch")
    go = torch.linspace(0.5, 1.5, 7) if reduction == "none" else torch.tensor(0.7)
    results = []
    for terms in (False, True):
        leaves = [t.clone().requires_grad_() for t in (inputs[0], inputs[2], inputs[3])]
        out = fastvae.elbo_loss(leaves[0], inputs[1], leaves[1], leaves[2], return_components=terms, **kw)
        loss = out.loss if terms else out
        assert isinstance(loss, torch.Tensor) and loss.shape == ((7,) if reduction == "none" else ())
        first = torch.autograd.grad(loss, leaves, go, retain_graph=True)
        again = torch.autograd.grad(loss, leaves, go)
        results.append((loss.detach(), first, again))
    (a, fa, ga), (b, fb, gb) = results
    assert torch.equal(a, b)
    for x, y in zip(fa + ga, fb + gb):
        assert torch.equal(x, y)


@pytest.mark.parametrize("formulation", ["loops", "aten"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_mode_ad_of_the_loss_alone(case, reduction, formulation, monkeypatch):
    """Without return_components the fallback's op has one output (the loss alone): its tangent
    is the loss's tangent of the four-term form to the bit (checked against the oracle above)."""
    import torch.autograd.forward_ad as fwAD

    from conftest import use_formulation

    use_formulation(formulation, monkeypatch)
    likelihood, from_logits, sigma = case
    inputs = make(likelihood, from_logits, (6, 40), 3, device="cpu", seed=24)
    g = torch.Generator().manual_seed(24)
    tangents = [torch.randn(t.shape, generator=g) for t in inputs]
    kw = dict(reduction=reduction, beta=0.7, likelihood=likelihood, sigma=sigma, from_logits=from_logits,
              backend="torch")
    with fwAD.dual_level():
        duals = [fwAD.make_dual(t, d) for t, d in zip(inputs, tangents)]
        alone = fastvae.elbo_loss(*duals, **kw)
        terms = fastvae.elbo_loss(*duals, return_components=True, **kw)
        assert torch.equal(fwAD.unpack_dual(alone).primal, fwAD.unpack_dual(terms.loss).primal)
        assert torch.equal(fwAD.unpack_dual(alone).tangent, fwAD.unpack_dual(terms.loss).tangent)


def test_reparameterize_forward_mode_ad(backend_device):
    """z = mu + exp(logvar / 2) eps: the tangent mu' + exp(logvar / 2) eps logvar' / 2 on the
    fallback (plain tensor ops), a refusal by name on backend="triton"."""
    import torch.autograd.forward_ad as fwAD

    backend, device = backend_device
    g = torch.Generator().manual_seed(23)
    m, v, eps, dm, dv = (torch.randn(6, 3, generator=g).to(device) for _ in range(5))
    with fwAD.dual_level():
        md, vd = fwAD.make_dual(m, dm), fwAD.make_dual(v, dv)
        if backend == "triton":
            with pytest.raises(RuntimeError, match="forward-mode AD"):
                fastvae.reparameterize(md, vd, eps=eps, backend="triton")
            return
        dz = fwAD.unpack_dual(fastvae.reparameterize(md, vd, eps=eps, backend=backend)).tangent
    m64, v64, e64, dm64, dv64 = (t.double().cpu() for t in (m, v, eps, dm, dv))
    want = dm64 + torch.exp(0.5 * v64) * e64 * 0.5 * dv64
    torch.testing.assert_close(dz.double().cpu(), want, rtol=1e-5, atol=1e-6)


# ---- special values: every backend, one table ---------------------------------------------------------

INF, NAN = math.inf, math.nan
# (likelihood, from_logits): the decoder outputs tried, at targets 0, 1/2 and 1
SPECIAL = {
    ("bernoulli", True): [INF, -INF, NAN, 1e4, -1e4, 0.25],  # not 0: the oracle's |s| has a kink
    ("bernoulli", False): [0.0, 1.0, 0.5, NAN, -0.5, 1.5],
    ("gaussian", True): [INF, -INF, NAN, 1e4, -1e4, 0.0],
    ("mse", True): [INF, -INF, NAN, 1e4, -1e4, 0.0],
    ("continuous_bernoulli", True): [INF, -INF, NAN, 1e4, -1e4, 0.25],
}


def _right_value(likelihood, from_logits, s, t):
    """(nll, d nll / ds) of one pixel in float64: the oracle's, and at s = +-inf the limits that
    the float formulas cannot form (inf - inf); None where the value is not defined."""
    if math.isnan(s) or (likelihood == "bernoulli" and not from_logits and not 0.0 <= s <= 1.0):
        return NAN, None  # NaN recon, or a probability outside [0, 1]: NaN loss, d/ds unspecified
    if math.isinf(s) and likelihood in ("bernoulli", "continuous_bernoulli"):
        h = 1.0 if s > 0 else 0.0
        bce = 0.0 if h == t else INF                 # lim s (h - t) + log(1 + e^-|s|)
        d = h - t                                    # sigmoid(s) - t
        if likelihood == "bernoulli":
            return bce, d                            # F.binary_cross_entropy_with_logits gives NaN at
                                                     # (+inf, 1) and at -inf: the limits are these
        # continuous Bernoulli: bce - log C(s), log C -> +inf: -inf where the pixel is matched,
        # inf - inf (NaN on every backend, not a number here) elsewhere
        return (-INF if h == t else NAN), d
    one = lambda v: torch.tensor([[v]], dtype=torch.float64)  # noqa: E731
    z = torch.zeros(1, 1, dtype=torch.float64)
    loss, g = oracle.elbo(one(s), one(t), z, z, likelihood=likelihood, from_logits=from_logits)
    return loss.item(), g["recon"].item()


def test_every_backend_gives_the_right_value_at_special_values(monkeypatch):
    from conftest import BACKEND_DEVICES, use_formulation

    got = {}
    for backend, device, *formulation in BACKEND_DEVICES:
        with monkeypatch.context() as m:
            if formulation:
                use_formulation(formulation[0], m)
            name = "-".join((backend, device, *formulation))
            for (likelihood, from_logits), values in SPECIAL.items():
                for s in values:
                    for t in (0.0, 0.5, 1.0):
                        r = torch.tensor([[s]], device=device, requires_grad=True)
                        z = torch.zeros(1, 1, device=device)
                        loss = fastvae.elbo_loss(r, torch.tensor([[t]], device=device), z, z, backend=backend,
                                                 likelihood=likelihood, from_logits=from_logits)
                        loss.backward()
                        got[name, likelihood, from_logits, s, t] = (loss.item(), r.grad.item())
    names = ["-".join((b, d, *f)) for b, d, *f in BACKEND_DEVICES]
    assert len(names) >= 2
    for (likelihood, from_logits), values in SPECIAL.items():
        for s in values:
            for t in (0.0, 0.5, 1.0):
                want, want_d = _right_value(likelihood, from_logits, s, t)
                where = f"{likelihood} from_logits={from_logits} at s={s}, t={t}"
                for name in names:
                    loss, d = got[name, likelihood, from_logits, s, t]
                    torch.testing.assert_close(torch.tensor(loss, dtype=torch.float64),
                                               torch.tensor(want, dtype=torch.float64),
                                               rtol=1e-5, atol=1e-5, equal_nan=True, msg=f"{name}: {where}")
                    if want_d is not None:
                        torch.testing.assert_close(torch.tensor(d, dtype=torch.float64),
                                                   torch.tensor(want_d, dtype=torch.float64), rtol=1e-5,
                                                   atol=1e-5, equal_nan=True, msg=f"{name}: d/ds {where}")
                # and to each other: the same NaN / inf pattern and gradient, where the value is not
                # pinned above (out-of-range probabilities)
                first = got[names[0], likelihood, from_logits, s, t]
                for name in names[1:]:
                    other = got[name, likelihood, from_logits, s, t]
                    torch.testing.assert_close(torch.tensor(other, dtype=torch.float64),
                                               torch.tensor(first, dtype=torch.float64), rtol=1e-5,
                                               atol=1e-5, equal_nan=True, msg=f"{name} vs {names[0]}: {where}")


def test_triton_reads_uint8_targets_as_x_over_255_bit_for_bit():
    from conftest import BACKEND_DEVICES

    triton = [d for b, d, *_ in BACKEND_DEVICES if b == "triton"]
    if not triton:
        pytest.skip("no Triton backend here")
    device = triton[0]
    # "sum" walks the pixels flat, "none" by row tiles: both read x / 255
    for (likelihood, from_logits, sigma), reduction in itertools.product(CASES, ("sum", "none")):
        recon, _, mu, logvar = make(likelihood, from_logits, (4, 300), 3, device=device, seed=31)
        xb = torch.randint(0, 256, (4, 300), generator=torch.Generator().manual_seed(32),
                           dtype=torch.uint8).to(device)
        kw = dict(reduction=reduction, likelihood=likelihood, sigma=sigma, from_logits=from_logits,
                  backend="triton", return_components=True)
        a, la = call(recon, xb, mu, logvar, grad=("recon", "mu", "logvar"), **kw)
        b, lb = call(recon, torch.div(xb, 255.0), mu, logvar, grad=("recon", "mu", "logvar"), **kw)
        for x, y in zip(a, b):
            assert torch.equal(x, y), (likelihood, from_logits, reduction)
        ga, gb = fast_grads(a.loss.sum(), la), fast_grads(b.loss.sum(), lb)
        assert torch.equal(ga["recon"], gb["recon"]), (likelihood, from_logits, reduction)
        # and the right value: the float64 oracle on x / 255
        ref_leaves, ref = oracle.terms(recon, xb, mu, logvar, reduction=reduction, likelihood=likelihood,
                                       sigma=sigma, from_logits=from_logits)
        torch.testing.assert_close(a.loss.double().cpu(), ref["loss"].detach().cpu(), rtol=1e-5, atol=1e-5)
