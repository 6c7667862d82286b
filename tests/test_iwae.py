"""Importance-weighted bounds (fastvae.iwae): the streaming log-likelihood, the fused decoder-output
kernel and iwae_loss, against an unfused float64 computation on the same noise."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

import fastvae
from fastvae import iwae
from fastvae.evaluate import iw_log_likelihood as evaluate_iw


def unfused_log_w(x, mu, logvar, eps, fc3_w, fc3_b, w, b):
    """log w [K, N] in float64, written from the definitions (no shared code with fastvae)."""
    x, mu, logvar, eps, fc3_w, fc3_b, w, b = (t.double() for t in (x, mu, logvar, eps, fc3_w, fc3_b, w, b))
    z = mu + torch.exp(0.5 * logvar) * eps                          # [K, N, L]
    logits = F.relu(z @ fc3_w.t() + fc3_b) @ w.t() + b              # [K, N, D]
    log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
    normal = torch.distributions.Normal
    log_pz = normal(0.0, 1.0).log_prob(z).sum(-1)
    log_qz = normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    return log_px + log_pz - log_qz


def unfused_bound(*args):
    lw = unfused_log_w(*args)
    return torch.logsumexp(lw, 0) - math.log(lw.shape[0])


def real_model(seed=0, sharp=3.0):
    """A 784-400-20 VAE whose output logits spread like a trained model's (|l| up to ~20)."""
    torch.manual_seed(seed)
    m = fastvae.VAE(784, 400, 20)
    with torch.no_grad():
        m.fc4.weight.mul_(sharp)
        m.fc4.bias.copy_(torch.linspace(-8, 4, 784))
        m.fc22.bias.fill_(-2.0)                                       # q narrower than the prior
    return m


def images(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 784, generator=g)
    x[x < 0.5] = 0.0                                                  # background pixels, grey levels
    return x


@pytest.mark.parametrize("K,N,chunk_rows", [(300, 3, None), (300, 3, 64), (5, 40, 64), (7, 5, 1000), (1, 2, None)])
def test_streaming_bound_matches_unfused_float64_real_sizes(K, N, chunk_rows):
    m = real_model()
    x = images(N)
    g = torch.Generator().manual_seed(K)
    eps = torch.randn(K, N, 20, generator=g, dtype=torch.float64)
    with torch.no_grad():
        mu, logvar = m.encode(x)
        ll = iwae.iw_log_likelihood(x, mu, logvar, lambda z: F.relu(m.fc3(z)), m.fc4.weight, m.fc4.bias,
                                    num_samples=K, eps=eps, chunk_rows=chunk_rows, backend="torch")
    ref = unfused_bound(x, mu, logvar, eps, m.fc3.weight, m.fc3.bias, m.fc4.weight, m.fc4.bias)
    assert ll.dtype == torch.float64 and ll.shape == (N,)
    torch.testing.assert_close(ll, ref, rtol=1e-5, atol=0)


def test_worker_threads_match_oracle_and_draw_the_same_noise_whatever_their_number():
    m = real_model(seed=11)
    x = images(7, seed=12)
    K = 40
    eps = torch.randn(K, 7, 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    hid = lambda z: F.relu(m.fc3(z))  # noqa: E731
    with torch.no_grad():
        mu, logvar = m.encode(x)
        args = (x, mu, logvar, hid, m.fc4.weight, m.fc4.bias)
        given = iwae.iw_log_likelihood(*args, num_samples=K, eps=eps, chunk_rows=50, threads=3)
        drawn = [iwae.iw_log_likelihood(*args, num_samples=K, chunk_rows=50, threads=t,
                                        generator=torch.Generator().manual_seed(5)) for t in (1, 2, 3)]
    ref = unfused_bound(x, mu, logvar, eps, m.fc3.weight, m.fc3.bias, m.fc4.weight, m.fc4.bias)
    torch.testing.assert_close(given, ref, rtol=1e-5, atol=0)
    # groups of one image (K = 40 rows of 50): the noise of each is seeded by the group, not the
    # thread; only the fp32 rounding of multi-threaded reductions may differ
    for d in drawn[1:]:
        torch.testing.assert_close(d, drawn[0], rtol=1e-6, atol=0)
    assert torch.get_num_threads() >= 1


def test_evaluate_uses_the_streaming_bound_on_uint8_images():
    m = real_model(seed=2)
    x = (images(4, seed=3) * 255).round().to(torch.uint8)
    eps = torch.randn(50, 4, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    done = []
    ll = evaluate_iw(m, x, 50, eps=eps, max_elements=784 * 16)        # chunks of 16 rows
    with torch.no_grad():
        mu, logvar = m.encode(x)
    ref = unfused_bound(x.double() / 255, mu, logvar, eps, m.fc3.weight, m.fc3.bias, m.fc4.weight, m.fc4.bias)
    torch.testing.assert_close(ll, ref, rtol=1e-5, atol=0)
    # the progress callback counts every image once
    with torch.no_grad():
        iwae.iw_log_likelihood(x, mu, logvar, lambda z: F.relu(m.fc3(z)), m.fc4.weight, m.fc4.bias,
                               num_samples=3, chunk_rows=6, progress=done.append)
    assert sum(done) == 4 and len(done) == 2


def test_running_logsumexp_with_a_dominant_late_sample():
    # the largest weight comes in the last chunk, far above the others: the running maximum must
    # rescale the sum (a plain sum of exp would overflow or lose it)
    m = real_model(seed=4)
    x = images(2, seed=5)
    K = 40
    eps = torch.randn(K, 2, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.1
    eps[-1] = 8.0                                                      # far-out samples last
    eps[0, 0] = -8.0
    with torch.no_grad():
        mu, logvar = m.encode(x)
        ll = iwae.iw_log_likelihood(x, mu, logvar, lambda z: F.relu(m.fc3(z)), m.fc4.weight, m.fc4.bias,
                                    num_samples=K, eps=eps, chunk_rows=8, backend="torch")
    ref = unfused_bound(x, mu, logvar, eps, m.fc3.weight, m.fc3.bias, m.fc4.weight, m.fc4.bias)
    torch.testing.assert_close(ll, ref, rtol=1e-5, atol=0)


def test_drawn_noise_is_reproducible_and_unbiased_for_an_exact_case():
    # decoder ignores z: every weight is p(x) p(z) / q(z), and the bound converges to log p(x)
    m = fastvae.VAE(784, 16, 2)
    with torch.no_grad():
        for layer in (m.fc1, m.fc21, m.fc22, m.fc3, m.fc4):
            layer.weight.zero_()
        m.fc21.bias.fill_(0.3)
        m.fc22.bias.fill_(-0.2)
        m.fc4.bias.copy_(torch.linspace(-3, 3, 784))
    x = images(3, seed=6)
    exact = -F.binary_cross_entropy_with_logits(m.fc4.bias.double().expand(3, 784), x.double(),
                                                reduction="none").sum(1)
    a = evaluate_iw(m, x, 4000, generator=torch.Generator().manual_seed(0))
    b = evaluate_iw(m, x, 4000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    torch.testing.assert_close(a, exact, rtol=0, atol=0.05)


def test_bad_arguments():
    m = real_model()
    x = images(2)
    mu, logvar = torch.zeros(2, 20), torch.zeros(2, 20)
    hid = lambda z: F.relu(m.fc3(z))  # noqa: E731
    w, b = m.fc4.weight.detach(), m.fc4.bias.detach()
    for bad, err in ((0, ValueError), (-1, ValueError), (True, TypeError), (2.0, TypeError)):
        with pytest.raises(err, match="num_samples"):
            iwae.iw_log_likelihood(x, mu, logvar, hid, w, b, num_samples=bad)
    with pytest.raises(ValueError, match=r"eps must be \[num_samples, N, L\]"):
        iwae.iw_log_likelihood(x, mu, logvar, hid, w, b, num_samples=3, eps=torch.zeros(2, 2, 20))
    with pytest.raises(ValueError, match="x must be"):
        iwae.iw_log_likelihood(x[:, :700], mu, logvar, hid, w, b, num_samples=3)
    with pytest.raises(ValueError, match="bias"):
        iwae.iw_log_likelihood(x, mu, logvar, hid, w, b[:5], num_samples=3)
    with pytest.raises(TypeError, match="decoder_hidden"):
        iwae.iw_log_likelihood(x, mu, logvar, None, w, b, num_samples=3)
    with pytest.raises(ValueError, match="iw_samples"):
        evaluate_iw(m, x, 0)


# ---- the fused decoder-output + likelihood kernel (Triton; under the interpreter on CPU) -------

triton_only = pytest.mark.skipif(not fastvae.triton_available() or not (
    torch.cuda.is_available() or fastvae._backend.interpreter_enabled()), reason="needs the Triton kernels")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _decoder_case(M, H, D, n_img, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.relu(torch.randn(M, H, generator=g))
    w = torch.randn(D, H, generator=g) * 0.8
    b = torch.randn(D, generator=g) * 2 if bias else None
    x = torch.rand(n_img, D, generator=g)
    x[x < 0.4] = 0.0
    return h, w, b, x


def _ref_log_px(h, w, b, x, group, likelihood, sigma=1.0):
    l = h.double() @ w.double().t() + (b.double() if b is not None else 0.0)
    rows = torch.arange(h.shape[0])
    t = x.double()[(rows // group) % x.shape[0]]
    if likelihood == "bernoulli":
        return -F.binary_cross_entropy_with_logits(l, t, reduction="none").sum(1)
    if likelihood == "gaussian":
        return torch.distributions.Normal(l, sigma).log_prob(t).sum(1)
    return torch.distributions.ContinuousBernoulli(logits=l).log_prob(t).sum(1)


@triton_only
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "continuous_bernoulli"])
@pytest.mark.parametrize("M,H,D,n_img,group,bias", [(70, 40, 50, 7, 10, True), (37, 16, 64, 5, 1, False),
                                                   (130, 33, 65, 1, 130, True)])
def test_fused_decoder_kernel_matches_float64(likelihood, M, H, D, n_img, group, bias):
    h, w, b, x = _decoder_case(M, H, D, n_img, seed=M + D, bias=bias)
    sigma = 0.7
    out = torch.ops.fastvae.decoder_log_px(h.to(DEV), w.to(DEV), None if b is None else b.to(DEV), x.to(DEV),
                                           group, likelihood, sigma)
    ref = _ref_log_px(h, w, b, x, group, likelihood, sigma)
    assert out.shape == (M,) and out.dtype == torch.float32
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-4)


@triton_only
def test_fused_decoder_kernel_is_deterministic_and_keeps_inputs():
    h, w, b, x = (t.to(DEV) for t in _decoder_case(70, 40, 50, 7, seed=3))
    copies = [t.clone() for t in (h, w, b, x)]
    a = torch.ops.fastvae.decoder_log_px(h, w, b, x, 10, "bernoulli", 1.0)
    c = torch.ops.fastvae.decoder_log_px(h, w, b, x, 10, "bernoulli", 1.0)
    assert torch.equal(a, c)
    for t, u in zip((h, w, b, x), copies):
        assert torch.equal(t, u)


@triton_only
@pytest.mark.parametrize("K,N,chunk_rows", [(50, 3, 20), (4, 9, 16)])
def test_streaming_bound_triton_path_matches_unfused_float64(K, N, chunk_rows):
    torch.manual_seed(7)
    m = fastvae.VAE(48, 24, 3).to(DEV)
    with torch.no_grad():
        m.fc4.weight.mul_(3.0)
    x = torch.rand(N, 48, device=DEV)
    eps = torch.randn(K, N, 3, dtype=torch.float64, device=DEV)
    with torch.no_grad():
        mu, logvar = m.encode(x)
        ll = iwae.iw_log_likelihood(x, mu, logvar, lambda z: F.relu(m.fc3(z)), m.fc4.weight, m.fc4.bias,
                                    num_samples=K, eps=eps, chunk_rows=chunk_rows, backend="triton")
    ref = unfused_bound(x.cpu(), mu.cpu(), logvar.cpu(), eps.cpu(), m.fc3.weight.cpu(), m.fc3.bias.cpu(),
                        m.fc4.weight.cpu(), m.fc4.bias.cpu())
    torch.testing.assert_close(ll.cpu(), ref, rtol=1e-5, atol=0)


# ---- iwae_loss: the K-sample bound as a training loss ------------------------------------------

def unfused_iwae_loss(h, w, b, x, z, mu, logvar, reduction="sum"):
    """float64 autograd reference: logits materialised, torch.distributions for the densities."""
    logits = h @ w.t() + (b if b is not None else 0.0)
    log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
    log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_qz = torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    rows = -(torch.logsumexp(log_px + log_pz - log_qz, 0) - math.log(z.shape[0]))
    return {"sum": rows.sum(), "batchmean": rows.mean(), "none": rows}[reduction]


def _loss_case(K, B, L, H, D, seed, device="cpu"):
    """Leaves (fc3 weight, fc3 bias, W, b, mu, logvar), eps and x: z and h are made from them."""
    g = torch.Generator().manual_seed(seed)
    fc3w = torch.randn(H, L, generator=g) * 0.5
    fc3b = torch.randn(H, generator=g) * 0.1
    w = torch.randn(D, H, generator=g) * (3.0 / math.sqrt(H))
    b = torch.linspace(-6, 3, D)
    mu = torch.randn(B, L, generator=g) * 0.5
    logvar = torch.randn(B, L, generator=g) * 0.3 - 1.0
    eps = torch.randn(K, B, L, generator=g)
    x = torch.rand(B, D, generator=g)
    x[x < 0.5] = 0.0
    return [t.to(device) for t in (fc3w, fc3b, w, b, mu, logvar)], eps.to(device), x.to(device)


def _run_loss(leaves, eps, x, fn, dtype, reduction, go):
    p = [t.detach().to(dtype).requires_grad_() for t in leaves]
    fc3w, fc3b, w, b, mu, logvar = p
    z = mu + torch.exp(0.5 * logvar) * eps.to(dtype)
    h = F.relu(z @ fc3w.t() + fc3b)
    loss = fn(h, w, b, x.to(dtype), z, mu, logvar, reduction)
    grads = torch.autograd.grad(loss, p, go.to(dtype) if go is not None else None)
    return loss.detach(), grads


def _assert_rel(a, ref, tol):
    # elementwise within tol relative to the tensor's scale, and the norm-wise relative error
    a, ref = a.double().cpu(), ref.double().cpu()
    scale = ref.abs().max().clamp(min=1e-30)
    assert ((a - ref).abs().max() / scale).item() <= tol, ((a - ref).abs().max() / scale).item()
    assert ((a - ref).norm() / ref.norm().clamp(min=1e-30)).item() <= tol


@pytest.mark.parametrize("reduction", ["sum", "batchmean", "none"])
@pytest.mark.parametrize("K,B", [(5, 3), (50, 2)])
def test_iwae_loss_and_gradients_match_float64_autograd_real_sizes(K, B, reduction):
    leaves, eps, x = _loss_case(K, B, 20, 400, 784, seed=K + B)
    go = torch.randn(B, dtype=torch.float64) if reduction == "none" else None

    def fused(h, w, b, x, z, mu, logvar, red):
        return fastvae.iwae_loss(h, w, b, x, z, mu, logvar, reduction=red, backend="torch")

    loss, grads = _run_loss(leaves, eps, x, fused, torch.float32, reduction, go)
    ref_loss, ref_grads = _run_loss(leaves, eps, x, unfused_iwae_loss, torch.float64, reduction, go)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    for name, a, r in zip(("fc3.weight", "fc3.bias", "weight", "bias", "mu", "logvar"), grads, ref_grads):
        _assert_rel(a, r, 1e-5)


@pytest.mark.parametrize("logvar_shape", ["L", "B1"])
def test_iwae_loss_with_a_broadcast_logvar(logvar_shape):
    """A logvar [L] shared by the batch (or [B, 1]), as reparameterize takes it: the bound and
    every gradient (logvar's summed back to its shape) against the float64 reference, whose
    torch.distributions.Normal broadcasts the same way."""
    leaves, eps, x = _loss_case(5, 3, 20, 400, 784, seed=8)  # the data of the real-sizes test
    leaves[5] = leaves[5][0] if logvar_shape == "L" else leaves[5][:, :1]

    def fused(h, w, b, x, z, mu, logvar, red):
        return fastvae.iwae_loss(h, w, b, x, z, mu, logvar, reduction=red, backend="torch")

    go = torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    loss, grads = _run_loss(leaves, eps, x, fused, torch.float32, "none", go)
    ref_loss, ref_grads = _run_loss(leaves, eps, x, unfused_iwae_loss, torch.float64, "none", go)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    assert grads[5].shape == leaves[5].shape
    for a, r in zip(grads, ref_grads):
        _assert_rel(a, r, 1e-5)


def test_iwae_loss_float64_and_chunking_over_samples(monkeypatch):
    # tiny chunks: the output layer's gradient is accumulated over many chunks of samples
    monkeypatch.setattr(iwae, "_CHUNK_ELEMENTS", 784 * 6)
    leaves, eps, x = _loss_case(9, 4, 20, 400, 784, seed=3)

    def fused(h, w, b, x, z, mu, logvar, red):
        return fastvae.iwae_loss(h, w, b, x, z, mu, logvar, reduction=red)

    loss, grads = _run_loss(leaves, eps, x, fused, torch.float64, "sum", None)
    ref_loss, ref_grads = _run_loss(leaves, eps, x, unfused_iwae_loss, torch.float64, "sum", None)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    for a, r in zip(grads, ref_grads):
        _assert_rel(a, r, 1e-10)


def test_iwae_loss_with_k1_is_the_single_sample_elbo():
    leaves, eps, x = _loss_case(1, 3, 20, 400, 784, seed=4)
    fc3w, fc3b, w, b, mu, logvar = leaves
    z = mu + torch.exp(0.5 * logvar) * eps
    h = F.relu(z @ fc3w.t() + fc3b)
    loss = fastvae.iwae_loss(h, w, b, x, z, mu, logvar, reduction="none")
    logits = h[0] @ w.t() + b
    # one sample: -log w = BCE + log q(z|x) - log p(z)
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)
    log_q_minus_p = 0.5 * (-eps[0].square() - logvar + z[0].square()).sum(1)
    torch.testing.assert_close(loss, bce + log_q_minus_p, rtol=1e-5, atol=1e-4)


@triton_only
def test_iwae_loss_triton_path_matches_float64_autograd():
    leaves, eps, x = _loss_case(6, 5, 3, 24, 50, seed=5, device=DEV)

    def fused(h, w, b, x, z, mu, logvar, red):
        return fastvae.iwae_loss(h, w, b, x, z, mu, logvar, reduction=red, backend="triton")

    loss, grads = _run_loss(leaves, eps, x, fused, torch.float32, "sum", None)
    ref_loss, ref_grads = _run_loss(leaves, eps, x, unfused_iwae_loss, torch.float64, "sum", None)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    for a, r in zip(grads, ref_grads):
        _assert_rel(a, r, 1e-5)


def test_iwae_loss_bad_arguments():
    h, w, b = torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(5)
    x, z, mu, lv = torch.zeros(3, 5), torch.zeros(2, 3, 6), torch.zeros(3, 6), torch.zeros(3, 6)
    with pytest.raises(ValueError, match="batchmean"):
        fastvae.iwae_loss(h, w, b, x, z, mu, lv, reduction="mean")
    with pytest.raises(ValueError, match="weight"):
        fastvae.iwae_loss(h, w[:, :3], b, x, z, mu, lv)
    with pytest.raises(ValueError, match="h and z"):
        fastvae.iwae_loss(h, w, b, x, z[:1], mu, lv)
    with pytest.raises(ValueError, match="x must be"):
        fastvae.iwae_loss(h, w, b, x[:, :4], z, mu, lv)
    with pytest.raises(ValueError, match="mu and logvar"):
        fastvae.iwae_loss(h, w, b, x, z, mu[:, :2], lv)
    with pytest.raises(ValueError, match=r"mu and logvar.*broadcast.*\(3, 6\) and \(2, 6\)"):
        fastvae.iwae_loss(h, w, b, x, z, mu, lv[:2])
    with pytest.raises(TypeError, match="h must"):
        fastvae.iwae_loss(h.long(), w, b, x, z, mu, lv)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=triton_only)])
def test_iwae_loss_checks_x_and_dtypes_as_elbo_loss_does_on_both_backends(backend):
    dev = DEV if backend == "triton" else "cpu"
    h, w, b = torch.rand(2, 3, 4, device=dev), torch.rand(5, 4, device=dev), torch.rand(5, device=dev)
    z, mu, lv = (torch.zeros(*shape, device=dev) for shape in ((2, 3, 6), (3, 6), (3, 6)))
    pixels = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(0)).to(dev)
    message = "x must be floating point, or uint8 pixel intensities read as x/255; got torch.int64"
    with pytest.raises(TypeError, match=re.escape(message)):
        fastvae.iwae_loss(h, w, b, pixels, z, mu, lv, backend=backend)
    with pytest.raises(TypeError, match=re.escape(message)):  # the same words as elbo_loss
        fastvae.elbo_loss(torch.zeros(3, 5, device=dev), pixels, mu, lv, backend=backend)
    # uint8 pixels are x / 255, as in elbo_loss
    got = fastvae.iwae_loss(h, w, b, pixels.to(torch.uint8), z, mu, lv, backend=backend)
    torch.testing.assert_close(got, fastvae.iwae_loss(h, w, b, pixels / 255.0, z, mu, lv, backend=backend))
    with pytest.raises(TypeError, match="h, weight and bias must share one dtype.*h torch.float16, weight "
                                        "torch.bfloat16"):
        fastvae.iwae_loss(h.half(), w.bfloat16(), b.bfloat16(), pixels / 255.0, z, mu, lv, backend=backend)
    with pytest.raises(TypeError, match="bias torch.float64"):
        fastvae.iwae_loss(h, w, b.double(), pixels / 255.0, z, mu, lv, backend=backend)


# ---- training on the IWAE objective ----------------------------------------------------------

def test_trainer_iwae_step_is_iwae_loss_of_the_model():
    from fastvae.training import DEFAULTS, Trainer

    # float64 end to end: the wiring (encoder, K samples, decoder, loss, gradients) is checked to
    # float64 rounding against the unfused bound on a separate copy of the model
    torch.manual_seed(0)
    model = fastvae.VAE(784, 32, 4).double()
    cfg = {**DEFAULTS, "objective": "iwae", "train_samples": 6}
    trainer = Trainer(model, cfg, torch.device("cpu"))
    x = (images(5, seed=8) * 255).to(torch.uint8)
    eps = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss = trainer._forward_loss(x, eps)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    # the same bound, unfused, in float64 on a copy of the model
    m64 = fastvae.VAE(784, 32, 4).double()
    m64.load_state_dict(model.state_dict())
    xf = x.double() / 255
    mu, logvar = m64.encode(xf)
    z = mu + torch.exp(0.5 * logvar) * eps.double()
    h = F.relu(m64.fc3(z))
    ref = unfused_iwae_loss(h, m64.fc4.weight, m64.fc4.bias, xf, z, mu, logvar, "sum")
    ref.backward()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=0)
    for n, p in m64.named_parameters():
        _assert_rel(got[n], p.grad, 1e-10)


def test_train_objective_iwae_runs_and_is_recorded(tmp_path):
    data = fastvae.load_dataset("mnist-5k").subset(256, 64)
    res = fastvae.train(data, epochs=1, hidden_dim=32, latent_dim=4, objective="iwae", train_samples=3,
                        out_dir=tmp_path, progress=False, device="cpu", figures=False)
    assert res.metrics["config"]["objective"] == "iwae" and res.metrics["config"]["train_samples"] == 3
    assert math.isfinite(res.metrics["train_loss"][0])
    with pytest.raises(ValueError, match="objective"):
        fastvae.train(data, epochs=2, hidden_dim=32, latent_dim=4, out_dir=tmp_path, resume=True,
                      objective="elbo", progress=False, device="cpu", figures=False)


@pytest.mark.parametrize("kwargs,match", [
    ({"objective": "vimco"}, "objective must be one of"),
    ({"train_samples": 5}, "objective='iwae'"),
    ({"objective": "iwae", "train_samples": 0}, "train_samples must be an integer >= 1"),
    ({"objective": "iwae", "train_samples": 5, "beta": 0.5}, "no KL weight"),
])
def test_train_objective_bad_arguments(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        fastvae.train("mnist-5k", out_dir=tmp_path, progress=False, device="cpu", **kwargs)


def test_cli_train_objective_flags(tmp_path):
    from fastvae.__main__ import _parser

    args = _parser().parse_args(["train", "--objective", "iwae", "--train-samples", "7"])
    assert args.objective == "iwae" and args.train_samples == 7


# ---- the evaluator under torch.distributed (2 gloo processes) --------------------------------

def _ddp_eval_worker(rank, world, port, x, eps, out):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        m = real_model(seed=9)
        given = evaluate_iw(m, x, eps.shape[0], eps=eps)
        # one image 4 times: shards [0, 1] and [2, 3] of the same image
        drawn = evaluate_iw(m, x[:1].repeat(4, 1), 20, generator=torch.Generator().manual_seed(3))
        torch.save({"given": given, "drawn": drawn}, out[rank])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_evaluator_shards_images_over_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    x = images(5, seed=10)                       # 5 images: shards of 3 and 2
    eps = torch.randn(30, 5, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    mp.spawn(_ddp_eval_worker, args=(2, port, x, eps, outs), nprocs=2, join=True)
    r0, r1 = (torch.load(o) for o in outs)
    single = evaluate_iw(real_model(seed=9), x, 30, eps=eps)
    # the same noise gives every image's single-process value (a wrong shard or order is off by
    # nats), gathered on both ranks
    torch.testing.assert_close(r0["given"], single, rtol=1e-6, atol=0)   # fp32 matmuls of other shapes
    assert torch.equal(r0["given"], r1["given"]) and torch.equal(r0["drawn"], r1["drawn"])
    drawn = r0["drawn"]
    assert drawn.shape == (4,) and torch.isfinite(drawn).all()
    # the ranks draw independent noise: the same image at the same place in both shards gets
    # another estimate (one stream on both ranks would repeat it exactly)
    assert drawn[0] != drawn[2] and drawn[1] != drawn[3]


@triton_only
def test_streaming_bound_triton_path_with_noise_drawn_in_the_kernel():
    # one chunk (all K samples of all images): the evaluator draws z = reparameterize(mu, logvar,
    # num_samples=K) once from the generator; the same draw, replayed, gives eps = (z - mu) / sigma,
    # and the bound must equal the unfused float64 bound on that eps
    torch.manual_seed(14)
    m = fastvae.VAE(48, 24, 3).to(DEV)
    with torch.no_grad():
        m.fc4.weight.mul_(3.0)
        m.fc21.bias.fill_(0.7)
    x = torch.rand(3, 48, device=DEV)
    K = 20
    with torch.no_grad():
        mu, logvar = m.encode(x)
        ll = iwae.iw_log_likelihood(x, mu, logvar, lambda z: F.relu(m.fc3(z)), m.fc4.weight, m.fc4.bias,
                                    num_samples=K, chunk_rows=K * 3, backend="triton",
                                    generator=torch.Generator(device=DEV).manual_seed(0))
        z = fastvae.reparameterize(mu, logvar, num_samples=K, backend="triton",
                                   generator=torch.Generator(device=DEV).manual_seed(0))
    eps = (z.double() - mu.double()) / torch.exp(0.5 * logvar.double())
    ref = unfused_bound(x.cpu(), mu.cpu(), logvar.cpu(), eps.cpu(), m.fc3.weight.cpu(), m.fc3.bias.cpu(),
                        m.fc4.weight.cpu(), m.fc4.bias.cpu())
    torch.testing.assert_close(ll.cpu(), ref, rtol=1e-5, atol=0)
