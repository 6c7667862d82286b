"""fastvae.train()'s epoch against the seed-style eager loop, side by side in one run.

Both train the same 784-400-20 VAE from the same initial weights on the same data with Adam at
lr 1e-3 and batch 128. The seed-style loop is :func:`fastvae.baselines.seed_train_epoch`
(TensorDataset + DataLoader, sigmoid + F.binary_cross_entropy + KL, Adam, ``loss.item()`` per
step); fastvae's is the epoch loop of :func:`fastvae.train` (``Trainer`` + ``train_epoch``).
Epochs alternate between the two after an untimed warm-up; epoch seconds cover training only.

    python benchmarks/compare_train.py --dataset fashion-mnist --epochs 3 --device cpu

prints both figures and writes ``benchmarks/results/train-<device>.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import fastvae
from fastvae.baselines import seed_loader, seed_test, seed_train_epoch
from fastvae.evaluate import neg_elbo_sum
from fastvae.training import Trainer, _device_name, resolve_device, train_epoch

RESULTS = Path(__file__).resolve().parent / "results"


class SeedStyle:
    """The seed-style loop: TensorDataset + DataLoader, eager loss, Adam, loss.item() per step."""

    def __init__(self, data, batch_size: int, lr: float, seed: int, device):
        self.device = device
        self.model = _init_model(data, seed, device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.train_loader = seed_loader(data.train_x.cpu(), data.train_y.cpu(), batch_size, shuffle=True)
        self.test_loader = seed_loader(data.test_x.cpu(), data.test_y.cpu(), batch_size, shuffle=False)

    def epoch(self) -> float:
        return seed_train_epoch(self.model, self.train_loader, self.opt, self.device)

    def test(self) -> float:
        return seed_test(self.model, self.test_loader, self.device)


class FastVAE:
    """fastvae.train()'s own epoch loop (:class:`fastvae.training.Trainer`, :func:`train_epoch`)."""

    def __init__(self, data, batch_size: int, lr: float, seed: int, device, compile: bool = False):
        self.data = data
        self.model = _init_model(data, seed, device)
        cfg = {"batch_size": batch_size, "lr": lr, "beta": 1.0, "seed": seed}
        self.trainer = Trainer(self.model, cfg, device, compile=compile)

    def epoch(self) -> float:
        return train_epoch(self.trainer, self.data.train_x).item() / self.data.train_x.shape[0]

    def test(self) -> float:
        self.model.eval()
        return neg_elbo_sum(self.model, self.data.test_x, self.trainer.noise_gen).item() / self.data.test_x.shape[0]


def _init_model(data, seed: int, device) -> fastvae.VAE:
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return fastvae.VAE(data.input_dim, 400, 20).to(device)


def _timed(fn, device) -> tuple[float, float]:
    t0 = time.perf_counter()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return value, time.perf_counter() - t0


def warm_up(data, batch_size: int, device, images: int = 12800) -> None:
    """Untimed: both loops over a slice of the data, so first-touch costs (allocator, page faults
    of a fresh VM's memory, lazy library init) land on neither side of the comparison."""
    small = data.subset(images, 1000)
    for cls in (SeedStyle, FastVAE):
        runner = cls(small, batch_size, 1e-3, 0, device)
        runner.epoch()
        runner.test()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="also torch.compile fastvae's step")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train-<device>.json)")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    data = fastvae.load_dataset(args.dataset, data_dir=args.data_dir, device=device)
    print(f"{data}\ndevice: {_device_name(device)}, torch {torch.__version__}", flush=True)
    warm_up(data, args.batch_size, device)
    kw = dict(batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=device)
    runners = {"seed_style": SeedStyle(data, **kw), "fastvae": FastVAE(data, compile=args.compile, **kw)}
    logs = {name: {"epoch_seconds": [], "train_loss": [], "test_loss": []} for name in runners}
    for epoch in range(args.epochs):
        # alternate which side goes first, so a drift in the machine's speed hits both alike
        order = list(runners) if epoch % 2 == 0 else list(runners)[::-1]
        for name in order:
            train_loss, seconds = _timed(runners[name].epoch, device)
            log = logs[name]
            log["train_loss"].append(train_loss)
            log["epoch_seconds"].append(seconds)
            log["test_loss"].append(runners[name].test())
            print(f"{name:10s} epoch {epoch + 1}: train {train_loss:.2f}  test {log['test_loss'][-1]:.2f}  "
                  f"({seconds:.2f} s)", flush=True)
    seed_style, fast = logs["seed_style"], logs["fastvae"]
    s_mean, f_mean = statistics.mean(seed_style["epoch_seconds"]), statistics.mean(fast["epoch_seconds"])
    result = {
        "benchmark": "train-epoch", "dataset": data.name, "n_train": data.train_x.shape[0],
        "n_test": data.test_x.shape[0], "model": "784-400-20", "batch_size": args.batch_size,
        "epochs": args.epochs, "device": _device_name(device), "torch": torch.__version__,
        "compile": args.compile, "seed_style": seed_style, "fastvae": fast,
        "seed_style_mean_epoch_seconds": s_mean, "fastvae_mean_epoch_seconds": f_mean,
        "speedup": s_mean / f_mean,
        "test_loss_difference": fast["test_loss"][-1] - seed_style["test_loss"][-1],
        "command": "python benchmarks/compare_train.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
    }
    print(f"\nseed-style loop: {s_mean:.2f} s/epoch, final test loss {seed_style['test_loss'][-1]:.2f}")
    print(f"fastvae.train:   {f_mean:.2f} s/epoch, final test loss {fast['test_loss'][-1]:.2f}")
    print(f"speed-up {result['speedup']:.2f}x; test loss difference {result['test_loss_difference']:+.2f} nats")
    out = Path(args.out) if args.out else RESULTS / f"train-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
