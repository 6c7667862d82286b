"""torch.library registration, torch.compile and CUDA graphs."""
import pytest
import torch

import fastvae
import oracle
HAS_CUDA = torch.cuda.is_available()


def _elbo_args(device, B=6, N=30, L=4, from_logits=True):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(B, N, generator=g)
    recon = (s if from_logits else torch.sigmoid(s)).to(device)
    return [recon, torch.rand(B, N, generator=g).to(device), torch.randn(B, L, generator=g).to(device),
            torch.randn(B, L, generator=g).to(device)]


@pytest.mark.skipif(not fastvae.triton_available(), reason="needs triton")
def test_ops_are_registered_and_pass_opcheck():
    device = "cuda" if HAS_CUDA else "cpu"
    if device == "cpu" and not fastvae._backend.interpreter_enabled():
        pytest.skip("Triton kernels need CUDA or the interpreter")
    # fake-tensor tracing launches nothing on a GPU, but the interpreter would run on fake data
    checks = ("test_schema", "test_autograd_registration") + (("test_faketensor",) if HAS_CUDA else ())
    for from_logits in (True, False):
        recon, x, mu, logvar = _elbo_args(device, from_logits=from_logits)
        for t in (recon, mu, logvar):
            t.requires_grad_()
        for reduction in ("sum", "batchmean", "none"):
            for grad, x_grad in ((True, False), (True, True), (False, False)):
                lik = "bernoulli" if from_logits or reduction != "none" else "continuous_bernoulli"
                torch.library.opcheck(torch.ops.fastvae.elbo.default,
                                      (recon, x, mu, logvar, None, 1.0, 0.0, 0.5, 0.0, lik,
                                       from_logits or lik != "bernoulli", reduction, grad, x_grad, False),
                                      test_utils=checks)
    # a learned sigma (Gaussian) and free bits
    recon, x, mu, logvar = _elbo_args(device)
    sigma = (torch.rand(30, device=device) + 0.5).expand(6, 30).requires_grad_()
    for reduction in ("sum", "none"):
        torch.library.opcheck(torch.ops.fastvae.elbo.default,
                              (recon, x, mu, logvar, sigma, 1.0, 0.0, 1.0, 0.3, "gaussian", True,
                               reduction, True, False, True), test_utils=checks)
    # the backward's in-place scaling op (declared mutating)
    B, N, L = 6, 30, 4
    bufs = [torch.randn(B, N, device=device), torch.randn(B, N, device=device),
            torch.randn(B, N, device=device), torch.randn(B, L, device=device),
            torch.randn(B, L, device=device)]
    active = torch.tensor([1.0, 0.0, 1.0, 1.0], device=device)
    for g in (torch.tensor([-0.5, 0.2, 0.0, 1.5], device=device), torch.randn(4, B, device=device)):
        for act in (active, torch.empty(0, device=device)):
            torch.library.opcheck(torch.ops.fastvae.elbo_scale_grads_.default,
                                  (g, 0.7, *[b.clone() for b in bufs], act), test_utils=checks)
    mu = torch.randn(5, 3, device=device, requires_grad=True)
    logvar = torch.randn(5, 3, device=device, requires_grad=True)
    eps = torch.randn(5, 3, device=device)
    seed = torch.tensor([42], device=device)
    for args in ((mu, logvar, eps, None), (mu, logvar, None, seed)):
        torch.library.opcheck(torch.ops.fastvae.reparameterize.default, args, test_utils=checks)


def test_fallback_compiles_fullgraph():
    """The PyTorch fallback traces without graph breaks and gives the float64 oracle's values and
    gradients."""
    recon, x, mu, logvar = _elbo_args("cpu")
    eps = torch.randn_like(mu)

    def step(recon, x, mu, logvar, eps):
        z = fastvae.reparameterize(mu, logvar, eps=eps, backend="torch")
        return fastvae.elbo_loss(recon, x, z, logvar, beta=0.5, backend="torch")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [t.detach().clone().requires_grad_() for t in (recon, mu, logvar)]
    loss = compiled(leaves[0], x, leaves[1], leaves[2], eps)
    got = (loss, *torch.autograd.grad(loss, leaves))
    # against the float64 oracle, not against eager fastvae: z = mu + exp(logvar / 2) eps feeds the
    # loss's mu, so the chain rule runs through both ops
    r64, m64, v64 = (t.detach().double() for t in (recon, mu, logvar))
    z64, _ = oracle.reparameterize(m64, v64, eps, torch.ones_like(m64))
    ref_loss, ref_grads = oracle.elbo(r64, x, z64, v64, beta=0.5)
    # oracle.elbo differentiates w.r.t. its own inputs: chain the latent gradients by hand
    dz = ref_grads["mu"]
    sigma = torch.exp(0.5 * v64)
    want = (ref_loss, ref_grads["recon"], dz, ref_grads["logvar"] + dz * 0.5 * eps.double() * sigma)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_fallback_continuous_bernoulli_compiles_fullgraph_before_eager(monkeypatch):
    """The continuous Bernoulli's series keep their coefficients as 0-dim tensors, cached per
    dtype and device: traced first with an empty cache, then eager, both give the float64
    oracle's loss and gradients. The traced call leaves the cache empty (a tensor it cached would be
    an output of the compiled region, which a CUDA-graph replay overwrites); the eager call fills it
    with real tensors, not the tracer's."""
    from fastvae import _fallback
    monkeypatch.setattr(_fallback, "_CONSTANTS", {})
    recon, x, mu, logvar = _elbo_args("cpu")
    recon = 3.0 * recon  # both branches of the log-normaliser, |s| below and above 0.75

    def loss_fn(recon, x, mu, logvar):
        return fastvae.elbo_loss(recon, x, mu, logvar, likelihood="continuous_bernoulli", backend="torch")

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    ref_loss, ref_grads = oracle.elbo(recon.double(), x, mu.double(), logvar.double(),
                                      likelihood="continuous_bernoulli")
    for fn in (compiled, loss_fn):
        leaves = [t.detach().clone().requires_grad_() for t in (recon, mu, logvar)]
        loss = fn(leaves[0], x, leaves[1], leaves[2])
        grads = torch.autograd.grad(loss, leaves)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
        for g, name in zip(grads, ("recon", "mu", "logvar")):
            torch.testing.assert_close(g.double(), ref_grads[name], rtol=1e-5, atol=1e-6)
        if fn is compiled:
            assert not _fallback._CONSTANTS
    assert _fallback._CONSTANTS
    assert all(type(c) is torch.Tensor for cs in _fallback._CONSTANTS.values() for c in cs)


# --- on a GPU: compiled Triton kernels under torch.compile and CUDA graphs ----------------------

def _tiny_vae(device):
    torch.manual_seed(0)
    enc = torch.nn.Linear(30, 8).to(device)
    dec = torch.nn.Linear(4, 30).to(device)
    return enc, dec


def _vae_loss(enc, dec, x, eps=None, backend="auto"):
    mu, logvar = enc(x).chunk(2, dim=1)
    z = fastvae.reparameterize(mu, logvar, eps=eps, backend=backend)
    return fastvae.FusedELBO(backend=backend)(dec(z), x, mu, logvar), z, mu, logvar


# torch.compile(fullgraph=True) of a loss: dynamo traces the forward, and AOTAutograd compiles the
# backward that torch.autograd.grad then runs (dynamo does not trace torch.autograd.grad itself:
# "trace_autograd_ops=False", so a compiled function that calls it cannot be fullgraph). Each GPU
# test below runs a helper on CUDA with the Triton kernels; its CPU twin runs the same helper on
# the fallback with the aot_eager backend, which keeps the helper itself tested without a GPU.

def _check_compiled_training_step(device, backend, compile_backend):
    enc, dec = _tiny_vae(device)
    params = list(enc.parameters()) + list(dec.parameters())
    x = torch.rand(16, 30, device=device)
    eps = torch.randn(16, 4, device=device)

    def loss_fn(x, eps):
        return _vae_loss(enc, dec, x, eps, backend)[0]

    compiled = torch.compile(loss_fn, fullgraph=True, backend=compile_backend)
    loss_e = loss_fn(x, eps)
    grads_e = torch.autograd.grad(loss_e, params)
    loss_c = compiled(x, eps)
    grads_c = torch.autograd.grad(loss_c, params)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-4)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_compile_fullgraph_training_step_gpu():
    _check_compiled_training_step("cuda", "auto", "inductor")


def test_compile_fullgraph_training_step_helper_on_cpu():
    _check_compiled_training_step("cpu", "torch", "aot_eager")


@pytest.mark.gpu
def test_cuda_graph_replay_draws_fresh_noise_gpu():
    enc, dec = _tiny_vae("cuda")
    x = torch.rand(16, 30, device="cuda")
    params = list(enc.parameters()) + list(dec.parameters())
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up (and compile the kernels) outside the graph
            loss, z, mu, logvar = _vae_loss(enc, dec, x)
            torch.autograd.grad(loss, params)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, z, mu, logvar = _vae_loss(enc, dec, x)
        grads = torch.autograd.grad(loss, params)
    seen = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        seen.append(z.clone())
        eps = (z - mu) / torch.exp(0.5 * logvar)
        ref_loss, _ = oracle.elbo(dec(z), x, mu, logvar)
        torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-5, atol=1e-3)
        assert abs(eps.mean().item()) < 0.5
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])


def _cuda_elbo_inputs(B, N=784, L=20):
    """(recon logits, x, mu, logvar, the generator that drew them) on CUDA; all but x require grad."""
    g = torch.Generator(device="cuda").manual_seed(0)
    recon = torch.randn(B, N, device="cuda", generator=g, requires_grad=True)
    x = torch.rand(B, N, device="cuda", generator=g)
    mu = torch.randn(B, L, device="cuda", generator=g, requires_grad=True)
    logvar = torch.randn(B, L, device="cuda", generator=g, requires_grad=True)
    return recon, x, mu, logvar, g


def _elbo_step(reduction, backend="auto"):
    def loss_fn(recon, x, mu, logvar):
        return fastvae.elbo_loss(recon, x, mu, logvar, reduction=reduction, beta=0.5, backend=backend)
    return loss_fn


def _check_elbo_any_grad_output(out, recon, x, mu, logvar, reduction, go):
    ref_loss, ref = oracle.elbo(recon, x, mu, logvar, reduction=reduction, beta=0.5, grad_output=go)
    torch.testing.assert_close(out[0].double().cpu(), ref_loss, rtol=1e-5, atol=1e-4)
    for got, name in zip(out[1:], ("recon", "mu", "logvar")):
        torch.testing.assert_close(got.double().cpu(), ref[name], rtol=1e-5, atol=1e-6)


def _check_compiled_elbo_any_grad_output(recon, x, mu, logvar, reduction, backend, compile_backend):
    """The compiled loss (fullgraph) and its compiled backward, with grad_output 1, -0.25 and one
    value per row, against the oracle; eager alongside."""
    loss_fn = _elbo_step(reduction, backend)
    compiled = torch.compile(loss_fn, fullgraph=True, backend=compile_backend)
    shape = (recon.shape[0],) if reduction == "none" else ()
    for value in (1.0, -0.25, "rows"):
        go = (torch.randn(shape, device=recon.device) if value == "rows"
              else torch.full(shape, value, device=recon.device))
        for fn in (compiled, loss_fn):
            loss = fn(recon, x, mu, logvar)
            out = (loss, *torch.autograd.grad(loss, (recon, mu, logvar), go))
            _check_elbo_any_grad_output(out, recon, x, mu, logvar, reduction, go)


@pytest.mark.parametrize("reduction", ["sum", "batchmean", "none"])
def test_compiled_elbo_any_grad_output_helper_on_cpu(reduction):
    g = torch.Generator().manual_seed(0)
    recon = torch.randn(37, 50, generator=g).requires_grad_()
    x = torch.rand(37, 50, generator=g)
    mu, logvar = (torch.randn(37, 6, generator=g).requires_grad_() for _ in range(2))
    _check_compiled_elbo_any_grad_output(recon, x, mu, logvar, reduction, "torch", "aot_eager")


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["sum", "batchmean", "none"])
def test_single_pass_under_compile_and_cuda_graphs_any_grad_output_gpu(reduction):
    """The forward writes the gradients; the backward scales them by any grad_output, also per row,
    compiled (fullgraph forward, AOTAutograd backward) and replayed from a CUDA graph with new
    grad_output values each time."""
    B = 257
    recon, x, mu, logvar, _ = _cuda_elbo_inputs(B)
    _check_compiled_elbo_any_grad_output(recon, x, mu, logvar, reduction, "auto", "inductor")

    loss_fn = _elbo_step(reduction)
    go = torch.empty(B if reduction == "none" else (), device="cuda")

    def step(recon, x, mu, logvar, go):
        loss = loss_fn(recon, x, mu, logvar)
        return (loss, *torch.autograd.grad(loss, (recon, mu, logvar), go))

    go.fill_(1.0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step(recon, x, mu, logvar, go)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(recon, x, mu, logvar, go)
    for value in (1.0, 3.0, "rows", 1.0):
        go.copy_(torch.randn(go.shape, device="cuda") if value == "rows" else torch.full(go.shape, value))
        graph.replay()
        torch.cuda.synchronize()
        _check_elbo_any_grad_output(out, recon, x, mu, logvar, reduction, go.clone())


@pytest.mark.gpu
@pytest.mark.parametrize("likelihood", ["gaussian", "continuous_bernoulli"])
def test_components_sigma_beta_tensor_under_compile_and_cuda_graphs_gpu(likelihood):
    """The Triton path with a learned sigma, a beta tensor (annealed between replays), free bits
    and components, compiled (fullgraph) and replayed from a CUDA graph, against the PyTorch
    fallback on the same CUDA tensors (float64, the exact path)."""
    recon, x, mu, logvar, g = _cuda_elbo_inputs(300)
    sigma = (torch.rand(784, device="cuda", generator=g) + 0.5).requires_grad_(likelihood == "gaussian")
    beta = torch.tensor(0.3, device="cuda", requires_grad=True)

    _check_compiled_components(recon, x, mu, logvar, sigma, beta, likelihood, "auto", "inductor")
    step = _components_step(likelihood, "auto", None)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step(recon, x, mu, logvar, sigma, beta)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(recon, x, mu, logvar, sigma, beta)
    for b in (0.3, 1.0, 0.05):
        with torch.no_grad():
            beta.fill_(b)
        graph.replay()
        torch.cuda.synchronize()
        _check_components(out, recon, x, mu, logvar, sigma, beta, likelihood)


def _components_step(likelihood, backend, compile_backend):
    """step(recon, x, mu, logvar, sigma, beta) -> (loss, reconstruction, kl, *grads of
    loss + reconstruction / 2 - kl / 4): the loss is compiled (fullgraph) when compile_backend is
    given; the gradients come from its (compiled) backward."""
    def components(recon, x, mu, logvar, sigma, beta):
        c = fastvae.elbo_loss(recon, x, mu, logvar, reduction="batchmean", beta=beta, free_bits=0.8,
                              likelihood=likelihood, sigma=sigma if likelihood == "gaussian" else None,
                              return_components=True, backend=backend)
        return c.loss, c.reconstruction, c.kl, c.loss + 0.5 * c.reconstruction - 0.25 * c.kl

    fn = components if compile_backend is None else torch.compile(components, fullgraph=True,
                                                                   backend=compile_backend)

    def step(recon, x, mu, logvar, sigma, beta):
        *values, total = fn(recon, x, mu, logvar, sigma, beta)
        leaves = [recon, mu, logvar, beta] + ([sigma] if sigma.requires_grad else [])
        return (*values, *torch.autograd.grad(total, leaves))
    return step


def _check_components(out, recon, x, mu, logvar, sigma, beta, likelihood):
    """Against the PyTorch fallback in float64 on the same tensors (the exact path)."""
    args = [t.detach().double().requires_grad_(t.requires_grad) for t in (recon, x, mu, logvar, sigma, beta)]
    ref = _components_step(likelihood, "torch", None)(*args)
    assert len(out) == len(ref)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * max(want.abs().max().item(), 1.0))


def _check_compiled_components(recon, x, mu, logvar, sigma, beta, likelihood, backend, compile_backend):
    _check_components(_components_step(likelihood, backend, compile_backend)(recon, x, mu, logvar, sigma, beta),
                      recon, x, mu, logvar, sigma, beta, likelihood)


@pytest.mark.parametrize("likelihood", ["gaussian", "continuous_bernoulli"])
def test_compiled_components_helper_on_cpu(likelihood):
    g = torch.Generator().manual_seed(0)
    recon = torch.randn(40, 60, generator=g).requires_grad_()
    x = torch.rand(40, 60, generator=g)
    mu, logvar = (torch.randn(40, 5, generator=g).requires_grad_() for _ in range(2))
    sigma = (torch.rand(60, generator=g) + 0.5).requires_grad_(likelihood == "gaussian")
    beta = torch.tensor(0.3, requires_grad=True)
    _check_compiled_components(recon, x, mu, logvar, sigma, beta, likelihood, "torch", "aot_eager")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_a_non_current_device_gpu():
    """Tensors on cuda:1 while cuda:0 is current: Triton launches on the current device, so the
    eager path makes the tensors' device current for its launches (loss, gradients and z against
    the float64 oracle)."""
    torch.cuda.set_device(0)
    g = torch.Generator(device="cuda:1").manual_seed(0)
    recon = torch.randn(64, 784, device="cuda:1", generator=g, requires_grad=True)
    x = torch.rand(64, 784, device="cuda:1", generator=g)
    mu = torch.randn(64, 20, device="cuda:1", generator=g, requires_grad=True)
    logvar = torch.randn(64, 20, device="cuda:1", generator=g, requires_grad=True)
    loss = fastvae.elbo_loss(recon, x, mu, logvar)
    grads = torch.autograd.grad(loss, (recon, mu, logvar))
    ref_loss, ref = oracle.elbo(recon, x, mu, logvar)
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-5, atol=1e-4)
    for got, name in zip(grads, ("recon", "mu", "logvar")):
        assert got.device == recon.device
        torch.testing.assert_close(got.double().cpu(), ref[name], rtol=1e-5, atol=1e-6)
    eps = torch.randn(64, 20, device="cuda:1", generator=g)
    z = fastvae.reparameterize(mu, logvar, eps=eps)
    ref_z, _ = oracle.reparameterize(mu, logvar, eps, torch.ones_like(mu))
    torch.testing.assert_close(z.double().cpu(), ref_z, rtol=1e-6, atol=1e-6)
    assert torch.cuda.current_device() == 0
