"""End to end: one training epoch of the classic 784-400-20 VAE at batch 128.

Group ``train-epoch-B128`` on a fixed synthetic data set of MNIST's shape (60,000 images of
28 x 28 uint8 pixels):

* ``eager``: the seed-style loop (TensorDataset + DataLoader, sigmoid + F.binary_cross_entropy +
  KL, Adam, ``loss.item()`` per step): :func:`fastvae.baselines.seed_train_epoch`.
* ``fastvae``: the epoch loop of :func:`fastvae.train` (data on the device as uint8, per-epoch
  permutation, fused loss on logits, fused Adam, one host read per epoch).

Both start from the same weights; the timed function is one whole epoch (synchronised on CUDA by
the ``bench`` fixture).
"""
import json

import pytest
import torch

import fastvae
from fastvae.baselines import seed_loader, seed_train_epoch
from fastvae.training import Trainer, train_epoch

N_IMAGES, BATCH = 60_000, 128
GROUP = f"train-epoch-B{BATCH}"


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (N_IMAGES, 784), dtype=torch.uint8, generator=gen)


def _model(device):
    torch.manual_seed(1)
    return fastvae.VAE(784, 400, 20).to(device)


def test_train_epoch_eager(bench, device, images):
    model = _model(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = seed_loader(images, torch.zeros(N_IMAGES, dtype=torch.long), batch_size=BATCH)
    losses = []
    bench(lambda: losses.append(seed_train_epoch(model, loader, opt, device)), group=GROUP,
          provider="eager", rounds=3, batch=BATCH, images=N_IMAGES)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_train_epoch_fastvae(bench, device, images):
    model = _model(device)
    trainer = Trainer(model, {"batch_size": BATCH, "lr": 1e-3, "beta": 1.0, "seed": 1}, device)
    x = images.to(device)
    losses = []
    bench(lambda: losses.append(train_epoch(trainer, x).item() / N_IMAGES), group=GROUP,
          provider="fastvae", rounds=3, batch=BATCH, images=N_IMAGES)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_compare_train_script_reports_speed_against_the_matmul_floor(tmp_path):
    """benchmarks/compare_train.py end to end on a small data set (what it reports, not how fast)."""
    from benchmarks.compare_train import main

    out = tmp_path / "train.json"
    r = main(["--dataset", "mnist-5k", "--train-images", "512", "--epochs", "1", "--precision", "fp32", "bf16",
              "--floor-seconds", "0.02", "--out", str(out)])
    assert json.loads(out.read_text()) == r
    assert r["n_train"] == 512
    steps = 512 // 128
    for prec in ("fp32", "bf16"):
        floor = r["matmul_floor"][prec]
        assert floor["epoch_seconds"] == pytest.approx(floor["step_seconds"] * steps)
        assert floor["gflops"] == pytest.approx(5 * 2 * 128 * 784 * 400 / floor["step_seconds"] / 1e9)
        run = r[f"fastvae_{prec}"]
        assert run["speedup"] == pytest.approx(r["seed_style"]["mean_epoch_seconds"] / run["mean_epoch_seconds"])
        assert run[f"fraction_of_{prec}_matmul_floor"] == pytest.approx(floor["epoch_seconds"] / run["mean_epoch_seconds"])
        assert run[f"fraction_of_{prec}_matmul_floor"] > 0  # (its size is a timing: not asserted)
        assert abs(run["test_loss_difference"]) < 25  # one epoch of 4 steps from the same start: close


def test_train_step_ab_script_reports_both_shortcuts():
    """benchmarks/train_step_ab.py on mnist-5k, one round: each side timed 20 times (what it
    reports, not how fast)."""
    from benchmarks.train_step_ab import main

    r = main(["--dataset", "mnist-5k", "--rounds", "1"])
    assert set(r) == {"step, gradients by hand", "step, autograd", "optimizer_step", "opt.step + zero_grad"}
    for v in r.values():
        assert 0 < v["q1"] <= v["median"] <= v["q3"]
