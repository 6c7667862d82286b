"""fastvae.train(): outputs, metrics, learning, exact resume, figures and bad arguments."""
import copy
import json

import matplotlib.image as mpimg
import pytest
import torch

import fastvae
from fastvae.baselines import eager_elbo, seed_loader, seed_test, seed_train_epoch
from fastvae.figures import compare_latents, save_decoded
from fastvae.training import Trainer, save_checkpoint

import oracle

QUIET = dict(progress=False, device="cpu")


@pytest.fixture(scope="module")
def mnist5k():
    return fastvae.load_dataset("mnist-5k")


@pytest.fixture(scope="module")
def small(mnist5k):
    return mnist5k.subset(640, 200)


@pytest.fixture(scope="module")
def run2d(tmp_path_factory):
    """A real run by name: mnist-5k, latent 2, two epochs, IWAE with K = 64."""
    out = tmp_path_factory.mktemp("run2d")
    result = fastvae.train("mnist-5k", epochs=2, latent_dim=2, iw_samples=64, out_dir=out, **QUIET)
    return result, out


def test_run_writes_metrics_checkpoint_and_figures(run2d):
    result, out = run2d
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result.metrics))
    for key in ("dataset", "device", "epochs", "train_loss", "test_loss", "epoch_seconds",
                "samples_per_second", "final_test_loss", "iw_log_likelihood", "iw_samples"):
        assert key in metrics, key
    assert metrics["dataset"] == "mnist-5k" and metrics["epochs"] == 2 and metrics["iw_samples"] == 64
    assert metrics["device"].startswith("cpu")
    assert len(metrics["train_loss"]) == len(metrics["test_loss"]) == len(metrics["epoch_seconds"]) == 2
    assert metrics["final_test_loss"] == metrics["test_loss"][-1]
    assert metrics["samples_per_second"] == pytest.approx(4000 * 2 / sum(metrics["epoch_seconds"]))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["config"]["latent_dim"] == 2
    assert {"model", "optimizer", "config", "rng"} <= set(ckpt)
    names = {"reconstructions.png", "samples.png", "loss_curve.png", "latent_scatter.png", "manifold.png"}
    assert set(metrics["figures"]) == names
    for name in names:
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].std() > 0.05, f"{name} is blank"
    assert not list(out.glob(".*tmp")), "a temporary file was left behind"


def test_loss_decreases_and_reaches_sane_values(run2d):
    m = run2d[0].metrics
    assert m["train_loss"][1] < m["train_loss"][0] - 20
    assert m["test_loss"][1] < m["test_loss"][0]
    assert 150 < m["final_test_loss"] < 240  # nats per image for a 2-d latent after two short epochs
    # the K = 64 importance-weighted bound is tighter than the single-sample ELBO
    assert -m["final_test_loss"] < m["iw_log_likelihood"] < 0


def test_decode_chosen_latents_of_trained_model(run2d, tmp_path):
    model = run2d[0].model
    images = fastvae.decode_latents(model, [[0.5, 0.0], [2.0, 0.0]])
    assert images.shape == (2, 784) and not torch.equal(images[0], images[1])
    path = save_decoded(model, [[0.5, 0.0], [2.0, 0.0]], tmp_path / "z.png")
    assert mpimg.imread(path).shape[1] > 100


def test_load_checkpoint_and_evaluate(run2d, mnist5k):
    model, ckpt = fastvae.load_checkpoint(run2d[1])
    result = fastvae.evaluate(model, mnist5k, iw_samples=16, generator=torch.Generator().manual_seed(0))
    assert result["n"] == 1000
    assert result["test_loss"] == pytest.approx(run2d[0].metrics["final_test_loss"], abs=2.0)
    assert result["iw_log_likelihood"] > result["elbo"]


def _state(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)


def _assert_equal_tree(a, b, path="state"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_equal_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_tree(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def test_resume_reproduces_uninterrupted_run_exactly(small, tmp_path):
    kw = dict(batch_size=64, figures=False, **QUIET)
    straight = fastvae.train(small, epochs=3, out_dir=tmp_path / "a", **kw)
    fastvae.train(small, epochs=1, out_dir=tmp_path / "b", **kw)
    resumed = fastvae.train(small, epochs=3, out_dir=tmp_path / "b", resume=True, **kw)
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    for name in ("model", "optimizer", "rng", "epoch", "history"):
        if name == "history":
            a[name].pop("epoch_seconds"), b[name].pop("epoch_seconds")
        _assert_equal_tree(a[name], b[name], name)
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    assert resumed.metrics["train_loss"] == straight.metrics["train_loss"]
    # a different seed really gives different weights: the equality above is not vacuous
    other = fastvae.train(small, epochs=1, seed=2, out_dir=None, **kw)
    assert not torch.equal(other.model.fc1.weight, resumed.model.fc1.weight)


def test_resume_without_epochs_continues_to_the_checkpoints_target(small, tmp_path):
    """An interrupted run (target 3, stopped after epoch 1) resumed with plain resume=True."""
    fastvae.train(small, epochs=1, batch_size=64, out_dir=tmp_path, figures=False, **QUIET)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    ckpt["config"]["epochs"] = 3  # as written after epoch 1 of an `epochs=3` run
    save_checkpoint(tmp_path / "checkpoint.pt", ckpt)  # with a fresh content hash
    resumed = fastvae.train(small, out_dir=tmp_path, resume=True, figures=False, **QUIET)
    assert resumed.metrics["epochs"] == 3 and len(resumed.metrics["train_loss"]) == 3
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 3


def test_resume_refuses_changed_settings(small, tmp_path):
    fastvae.train(small, epochs=1, batch_size=64, out_dir=tmp_path, figures=False, **QUIET)
    with pytest.raises(ValueError, match="lr=0.001/0.01"):
        fastvae.train(small, epochs=2, lr=0.01, out_dir=tmp_path, resume=True, **QUIET)


@pytest.mark.parametrize("kwargs, match", [
    ({"dataset": "cifar10"}, "unknown dataset 'cifar10'"),
    ({"latent_dim": 0}, "latent_dim must be an integer >= 1"),
    ({"hidden_dim": 2.5}, "hidden_dim must be an integer >= 1"),
    ({"epochs": 0}, "epochs must be an integer >= 1"),
    ({"lr": -1.0}, "lr must be a positive number"),
    ({"beta": float("nan")}, "beta must be a number >= 0"),
    ({"batch_size": 4001, "dataset": "mnist-5k"}, "batch_size 4001 is larger than the training set"),
    ({"device": "cuda:99" if torch.cuda.is_available() else "cuda"}, "device 'cuda.*"),
    ({"device": "tpu"}, "unknown device 'tpu'|not supported"),
    ({"backend": "cudnn"}, "backend must be one of"),
    ({"iw_samples": -5}, "iw_samples must be an integer >= 0"),
])
def test_bad_arguments_raise_value_error(kwargs, match, tmp_path):
    kwargs = {"dataset": "mnist-5k", "out_dir": tmp_path, **kwargs}
    with pytest.raises(ValueError, match=match):
        fastvae.train(progress=False, **kwargs)
    assert not (tmp_path / "metrics.json").exists()


def test_seed_style_baseline_learns_like_fastvae(small):
    torch.manual_seed(1)
    model = fastvae.VAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = seed_loader(small.train_x, small.train_y, batch_size=64)
    losses = [seed_train_epoch(model, loader, opt) for _ in range(3)]
    test = seed_test(model, seed_loader(small.test_x, small.test_y, shuffle=False))
    fast = fastvae.train(small, epochs=3, batch_size=64, out_dir=None, **QUIET).metrics
    assert losses[2] < losses[0] - 50
    # same model, same data, same optimiser: the two loops land close together
    assert test == pytest.approx(fast["final_test_loss"], rel=0.05)


def test_amp_and_torch_backend_paths_train(small):
    tiny = small.subset(256, 64)
    for kw in ({"amp": True}, {"backend": "torch"}):
        m = fastvae.train(tiny, epochs=2, batch_size=64, out_dir=None, **QUIET, **kw).metrics
        assert all(torch.isfinite(torch.tensor(m["train_loss"]))) and m["train_loss"][1] < m["train_loss"][0]


def test_triton_backend_smoke(small):
    # under TRITON_INTERPRET=1 (tests/conftest.py) this runs the real kernels on CPU, slowly
    from fastvae._backend import interpreter_enabled

    if not (torch.cuda.is_available() or interpreter_enabled()):
        pytest.skip("Triton kernels need a GPU or the interpreter")
    tiny = small.subset(128, 32)
    m = fastvae.train(tiny, epochs=2, batch_size=64, backend="triton", out_dir=None, **QUIET).metrics
    ref = fastvae.train(tiny, epochs=2, batch_size=64, backend="torch", out_dir=None, **QUIET).metrics
    assert m["train_loss"][1] < m["train_loss"][0]
    assert m["train_loss"][0] == pytest.approx(ref["train_loss"][0], rel=0.02)


def test_compare_latents_figure(small, tmp_path):
    path = compare_latents(small.subset(256, 16), latent_dims=(8, 2), out_dir=tmp_path, epochs=1,
                           batch_size=64, figures=False, **QUIET)
    assert path.name == "latent_comparison.png"
    assert mpimg.imread(path).shape[0] > 100
    assert (tmp_path / "latent-8" / "metrics.json").exists() and (tmp_path / "latent-2" / "checkpoint.pt").exists()


def test_compiled_step_is_one_graph(small):
    """compile=True: the forward and the fused loss trace as one graph, no breaks (the noise
    generator stays outside it)."""
    model = fastvae.VAE()
    trainer = Trainer(model, {"batch_size": 64, "lr": 1e-3, "beta": 1.0, "seed": 1},
                      torch.device("cpu"), compile=True)
    xb = small.train_x[:64]
    eps = torch.randn(64, model.latent_dim)
    explained = torch._dynamo.explain(trainer._forward_loss)(xb, eps)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    # and with the given noise the step computes the same loss as the eager path
    mu, logvar = model.encode(xb)
    z = mu + torch.exp(0.5 * logvar) * eps
    expected = eager_elbo(model.decode_logits(z), xb.float() / 255, mu, logvar)
    torch.testing.assert_close(trainer._forward_loss(xb, eps), expected, rtol=1e-5, atol=1e-2)


def _trainer(seed=1):
    torch.manual_seed(seed)
    model = fastvae.VAE()
    return Trainer(model, {"batch_size": 64, "lr": 1e-3, "beta": 1.0, "seed": 1}, torch.device("cpu"))


def _steps(trainer, x, n, via_optimizer=False):
    for i in range(n):
        xb = x[64 * i: 64 * (i + 1)]
        if via_optimizer:  # the reference: torch.optim's own step
            trainer.forward_loss(xb).backward()
            trainer.opt.step()
            trainer.opt.zero_grad(set_to_none=True)
        else:
            trainer.step(xb)


def test_direct_adam_step_is_torch_optims_step_bit_for_bit(small):
    """Trainer.optimizer_step calls the fused Adam kernel itself after the first step: the weights and
    the optimizer state after 6 steps are those of opt.step(), to the bit."""
    x = small.train_x
    ref, fast = _trainer(), _trainer()
    _steps(ref, x, 6, via_optimizer=True)
    _steps(fast, x, 6)
    assert fast._adam is not None  # the direct call really ran
    assert all(p.grad is None for p in fast.model.parameters())  # and zeroed the gradients
    for p, q in zip(ref.model.parameters(), fast.model.parameters()):
        assert torch.equal(p, q)
    _assert_equal_tree(ref.opt.state_dict(), fast.opt.state_dict(), "optimizer")
    assert fast.opt.state_dict()["state"][0]["step"].item() == 6


def test_direct_adam_step_follows_a_loaded_optimizer_state(small):
    """After opt.load_state_dict (a resume) the direct step uses the loaded moments, not the ones
    it had cached: same weights as a trainer that only ever used opt.step()."""
    x = small.train_x
    donor = _trainer(seed=3)
    _steps(donor, x, 3, via_optimizer=True)
    ref, fast = _trainer(), _trainer()
    for t in (ref, fast):
        _steps(t, x, 2, via_optimizer=t is ref)
        t.model.load_state_dict(donor.model.state_dict())
        # a deep copy, as from a checkpoint: load_state_dict keeps the given tensors, which the
        # two trainers would otherwise share
        t.opt.load_state_dict(copy.deepcopy(donor.opt.state_dict()))
        _steps(t, x[128:], 3, via_optimizer=t is ref)
    for p, q in zip(ref.model.parameters(), fast.model.parameters()):
        assert torch.equal(p, q)
    _assert_equal_tree(ref.opt.state_dict(), fast.opt.state_dict(), "optimizer")


def test_direct_adam_step_leaves_hooks_and_options_to_torch_optim(small):
    """A step hook still runs, and a changed lr is used at once."""
    x = small.train_x
    t = _trainer()
    _steps(t, x, 2)
    calls = []
    handle = t.opt.register_step_post_hook(lambda *a: calls.append(1))
    _steps(t, x, 2)
    handle.remove()
    assert calls == [1, 1]
    ref = _trainer()
    _steps(ref, x, 2, via_optimizer=True)
    state = ref.opt.state_dict()
    for tr in (t, ref):
        tr.model.load_state_dict(_trainer(seed=5).model.state_dict())
        tr.opt.load_state_dict(copy.deepcopy(state))
        tr.opt.param_groups[0]["lr"] = 0.25
        tr.noise_gen.manual_seed(7)
    _steps(t, x, 1)
    _steps(ref, x, 1, via_optimizer=True)
    for p, q in zip(ref.model.parameters(), t.model.parameters()):
        assert torch.equal(p, q)


def test_direct_adam_step_leaves_amsgrad_to_torch_optim(small):
    """An Adam the direct call does not cover (amsgrad) steps through opt.step(): the same weights
    as torch.optim's own step."""
    x = small.train_x
    fast, ref = _trainer(), _trainer()
    for t in (fast, ref):
        t.opt = torch.optim.Adam(t.model.parameters(), lr=1e-3, amsgrad=True, fused=True)
        t._adam = None
    _steps(fast, x, 3)
    _steps(ref, x, 3, via_optimizer=True)
    assert fast._adam is None
    for p, q in zip(fast.model.parameters(), ref.model.parameters()):
        assert torch.equal(p, q)


def _vae_oracle_grads(model, xb, eps, beta):
    """The float64 oracle of one step: the VAE's forward written from its layers with the given
    noise, the loss from tests/oracle.py, autograd in float64: (loss, {parameter name: grad})."""
    p = {n: t.detach().double().requires_grad_() for n, t in model.named_parameters()}
    x = oracle.as_float64_target(xb).reshape(xb.shape[0], -1)
    lin = lambda name, v: v @ p[f"{name}.weight"].t() + p[f"{name}.bias"]  # noqa: E731
    h1 = torch.relu(lin("fc1", x))
    mu, logvar = lin("fc21", h1), lin("fc22", h1)
    z = mu + torch.exp(0.5 * logvar) * eps.double()
    s = lin("fc4", torch.relu(lin("fc3", z)))
    # the oracle's leaves are copies: chain them back to the parameters through s, mu, logvar
    leaves, terms = oracle.terms(s, x, mu, logvar, beta=beta)
    g = oracle.grads(terms["loss"], leaves)
    total = (s * g["recon"]).sum() + (mu * g["mu"]).sum() + (logvar * g["logvar"]).sum()
    grads = torch.autograd.grad(total, list(p.values()))
    return terms["loss"].detach(), dict(zip(p, grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", [1.0, 0.37])
def test_manual_step_gradients_match_autograd_and_the_float64_oracle(small, dtype, beta):
    """fastvae._step.vae_elbo_grads (the CPU training step's hand-written backward): the loss and
    every parameter's gradient are autograd's through FusedELBO and reparameterize to the bit (the
    same ATen calls), and the float64 oracle's to float rounding; 1,100 rows of real digits."""
    from fastvae._step import manual_step_supported, vae_elbo_grads

    torch.manual_seed(0)
    model = fastvae.VAE().to(dtype)
    xb = small.train_x.repeat(2, 1)[:1100]  # uint8, > 1,024 rows
    assert manual_step_supported(model, "auto")
    gen = torch.Generator().manual_seed(4)
    loss = vae_elbo_grads(model, xb, beta, gen)
    manual = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    gen.manual_seed(4)
    eps = torch.randn(1100, model.latent_dim, dtype=dtype, generator=gen)
    gen.manual_seed(4)
    logits, mu, logvar = model(xb, generator=gen)
    ref = fastvae.FusedELBO(reduction="sum", beta=beta)(logits, model.prepare_input(xb), mu, logvar)
    ref.backward()
    assert torch.equal(loss, ref.detach())
    for n, q in model.named_parameters():
        assert torch.equal(manual[n], q.grad), n
    want_loss, want = _vae_oracle_grads(model, xb, eps, beta)
    # measured here: loss 3e-8 (fp32) / 2e-16 (fp64) relative; gradients within 2.6e-7 / 5e-16 of
    # each tensor's largest element (a chain of five GEMMs over up to 1,100 rows, each rounding
    # once): the bounds leave about 8x (fp32) and 20x (fp64)
    rtol, gtol = (1e-6, 2e-6) if dtype == torch.float32 else (1e-13, 1e-14)
    torch.testing.assert_close(loss.double(), want_loss, rtol=rtol, atol=0)
    for n, g in want.items():
        torch.testing.assert_close(manual[n].double(), g, rtol=0, atol=gtol * g.abs().max().item(), msg=n)


def test_manual_step_is_what_trainer_uses_and_steps_like_autograd(small):
    """Trainer.step takes the hand-written gradients for the plain VAE (and autograd for a
    subclass or a hooked model); three steps either way give the same weights to the bit."""
    from fastvae._step import manual_step_supported

    x = small.train_x
    fast, ref = _trainer(), _trainer()
    ref._manual = False
    _steps(fast, x, 3)
    _steps(ref, x, 3)
    for p, q in zip(fast.model.parameters(), ref.model.parameters()):
        assert torch.equal(p, q)

    class Sub(fastvae.VAE):
        pass

    assert not manual_step_supported(Sub(), "auto")
    hooked = fastvae.VAE()
    handle = hooked.fc3.register_forward_hook(lambda *a: None)
    assert not manual_step_supported(hooked, "auto")
    handle.remove()
    assert manual_step_supported(hooked, "auto")
    hooked.fc1.weight.register_hook(lambda g: g)
    assert not manual_step_supported(hooked, "auto")
    swapped = fastvae.VAE()
    swapped.fc3 = torch.nn.Sequential(torch.nn.Linear(20, 400))  # a layer that is not a plain Linear
    assert not manual_step_supported(swapped, "auto")
    swapped.fc3 = torch.nn.Linear(20, 400, bias=False)
    assert not manual_step_supported(swapped, "auto")
    frozen = fastvae.VAE()
    frozen.fc21.bias.requires_grad_(False)
    assert not manual_step_supported(frozen, "auto")
    assert not manual_step_supported(fastvae.VAE().half(), "auto")
    accumulating = fastvae.VAE()  # gradients already there: autograd adds to them
    accumulating.fc4.bias.grad = torch.zeros(784)
    assert not manual_step_supported(accumulating, "auto")


def test_cuda_graph_step_applies_where_it_can():
    from fastvae.graph_step import unsupported_reason

    cuda = torch.device("cuda", 0)
    assert unsupported_reason(cuda, 1, False, "elbo") is None
    assert "CUDA" in unsupported_reason(torch.device("cpu"), 1, False, "elbo")
    assert "DDP" in unsupported_reason(cuda, 2, False, "elbo")
    assert "compile" in unsupported_reason(cuda, 1, True, "elbo")
    assert "iwae" in unsupported_reason(cuda, 1, False, "iwae")


def test_cpu_training_reports_no_cuda_graph(small):
    result = fastvae.train(small, epochs=1, device="cpu", out_dir=None, progress=False, figures=False)
    assert result.metrics["cuda_graph"] is False


@pytest.mark.gpu
def test_cuda_graph_step_trains_as_the_eager_step():
    """The captured step (one graph per batch size, the last smaller batch included, noise from the
    run's generator replayed fresh) trains the model the eager step trains: same losses per epoch
    and weights, to fp32 rounding (the two use Adam's capturable and plain fused kernels)."""
    data = fastvae.load_dataset("mnist-5k").subset(700, 100)   # 700 = 5 x 128 + 60: two batch sizes
    kw = dict(epochs=3, device="cuda", out_dir=None, progress=False, figures=False, precision="fp32")
    graph = fastvae.train(data, cuda_graph=True, **kw)
    eager = fastvae.train(data, cuda_graph=False, **kw)
    assert graph.metrics["cuda_graph"] and not eager.metrics["cuda_graph"]
    for key in ("train_loss", "test_loss"):
        torch.testing.assert_close(torch.tensor(graph.metrics[key]), torch.tensor(eager.metrics[key]),
                                   rtol=1e-5, atol=0)
    for a, b in zip(graph.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_cuda_graph_step_logic_on_cpu(mnist5k, monkeypatch):
    """The graph step's bookkeeping, on CPU: CUDA's record-and-replay is stood in for by a graph
    that runs the captured step again on each replay (and the side stream by none). One graph per
    batch size, captured on the second step of that size and replayed on every later one, the
    first step of each size trained eagerly; the result is the eager step's training (same losses
    and weights to fp32 rounding: the eager CPU step takes the hand-written gradients and the
    plain fused Adam, the graph step autograd and the capturable one)."""
    import contextlib

    from fastvae import graph_step, training

    class Replayed:
        def __init__(self, step):
            self.step, self.replays = step, 0

        def replay(self):
            self.replays += 1
            self.step()

    graphs = []

    def capture(step, generator):
        graphs.append(Replayed(step))
        return graphs[-1]

    monkeypatch.setattr(graph_step, "capture", capture)
    monkeypatch.setattr(graph_step, "side_stream", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(training, "unsupported_reason", lambda *args: None)
    data = mnist5k.subset(700, 100)  # 5 x 128 + 60: two batch sizes
    kw = dict(epochs=3, batch_size=128, device="cpu", out_dir=None, progress=False, figures=False,
              precision="fp32")
    graph = fastvae.train(data, **kw)
    monkeypatch.undo()
    eager = fastvae.train(data, cuda_graph=False, **kw)
    assert graph.metrics["cuda_graph"] and not eager.metrics["cuda_graph"]
    # 128: warm-up on step 1, captured on step 2, replayed on steps 2-5 of epoch 1 and all 5 of
    # epochs 2 and 3; 60: warm-up in epoch 1, captured and replayed in epoch 2, replayed in epoch 3
    assert [g.replays for g in graphs] == [4 + 5 + 5, 1 + 1]
    for key in ("train_loss", "test_loss"):
        torch.testing.assert_close(torch.tensor(graph.metrics[key]), torch.tensor(eager.metrics[key]),
                                   rtol=1e-5, atol=0)
    for a, b in zip(graph.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
