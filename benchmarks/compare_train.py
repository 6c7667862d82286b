"""fastvae.train()'s epoch against the seed-style eager loop, side by side in one run.

Both train the same 784-400-20 VAE from the same initial weights on the same data with Adam at
lr 1e-3 and batch 128. The seed-style loop is :func:`fastvae.baselines.seed_train_epoch`
(TensorDataset + DataLoader, sigmoid + F.binary_cross_entropy + KL, Adam, ``loss.item()`` per
step); fastvae's is the epoch loop of :func:`fastvae.train` (``Trainer`` + ``train_epoch``).
Epochs alternate between the loops after an untimed warm-up; epoch seconds cover training only.

fastvae runs in each precision asked for (``--precision``: fp32, and bf16 autocast where the CPU
has native bf16, by default). The same script measures the machine's rate for the five
128x784x400-class matrix products of a step (two forward, three backward: fc1 and fc4) in each
precision, and reports each loop's epoch against that matmul floor (floor seconds / epoch seconds).

    python benchmarks/compare_train.py --dataset fashion-mnist --epochs 3 --device cpu

prints the figures and writes ``benchmarks/results/train-<device>.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

import fastvae
from fastvae.baselines import seed_loader, seed_test, seed_train_epoch
from fastvae.evaluate import neg_elbo_sum
from fastvae.training import Trainer, _device_name, cpu_has_native_bf16, resolve_device, train_epoch

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

    def __init__(self, data, batch_size: int, lr: float, seed: int, device, compile: bool = False,
                 precision: str = "fp32", cuda_graph: bool = True):
        self.data = data
        self.model = _init_model(data, seed, device)
        cfg = {"batch_size": batch_size, "lr": lr, "beta": 1.0, "seed": seed}
        self.trainer = Trainer(self.model, cfg, device, compile=compile, amp=precision == "bf16",
                               cuda_graph=cuda_graph)

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


def matmul_floor(device, batch: int, dtype: torch.dtype, hidden: int = 400, d: int = 784,
                 seconds_per_product: float = 0.2) -> dict:
    """Seconds per step of the five big matrix products of a training step in ``dtype``: forward
    fc1 [B,784]x[784,400] and fc4 [B,400]x[400,784]; backward fc4's input grad [B,784]x[784,400]
    and weight grad [784,B]x[B,400], fc1's weight grad [400,B]x[B,784]. The rest of a step (the
    latent-sized layers, the loss, Adam) is not in the floor."""
    shapes = [((batch, d), (d, hidden)), ((batch, hidden), (hidden, d)), ((batch, d), (d, hidden)),
              ((d, batch), (batch, hidden)), ((hidden, batch), (batch, d))]
    gen = torch.Generator(device=device).manual_seed(0)
    pairs = [(torch.randn(a, generator=gen, device=device).to(dtype),
              torch.randn(b, generator=gen, device=device).to(dtype)) for a, b in shapes]
    for a, b in pairs * 5:  # warm-up
        torch.mm(a, b)
    seconds = []
    for a, b in pairs:
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        reps = max(3, min(1000, int(seconds_per_product / 3 / max(time.perf_counter() - t0, 1e-6))))
        best = math.inf
        for _ in range(3):  # best of 3 timings of `reps` products
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, (time.perf_counter() - t0) / reps)
        seconds.append(best)
    flops = 5 * 2 * batch * d * hidden
    step = sum(seconds)
    return {"dtype": str(dtype).removeprefix("torch."), "step_seconds": step, "gflops": flops / step / 1e9,
            "product_seconds": seconds}


def warm_up(data, batch_size: int, device, precisions, images: int = 12800) -> None:
    """Untimed: every loop over a slice of the data, so first-touch costs (allocator, page faults
    of a fresh VM's memory, lazy library init) land on no side of the comparison."""
    small = data.subset(min(images, data.train_x.shape[0]), 1000)
    runners = [SeedStyle(small, batch_size, 1e-3, 0, device)]
    runners += [FastVAE(small, batch_size, 1e-3, 0, device, precision=p) for p in precisions]
    for runner in runners:
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
    p.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=None,
                   help="fastvae's precisions to run (default: fp32, plus bf16 on a CPU with native bf16)")
    p.add_argument("--train-images", type=int, default=None,
                   help="train on the first N training images only (for a quick check; default all)")
    p.add_argument("--floor-seconds", type=float, default=0.2,
                   help="time spent measuring each product of the matmul floor (default 0.2 s)")
    p.add_argument("--compile", action="store_true", help="also torch.compile fastvae's step")
    p.add_argument("--no-cuda-graph", action="store_true", help="fastvae's step eagerly on CUDA (no graph)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train-<device>.json)")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    precisions = args.precision or (["fp32", "bf16"] if device.type == "cpu" and cpu_has_native_bf16()
                                    else ["fp32"])
    data = fastvae.load_dataset(args.dataset, data_dir=args.data_dir, device=device)
    if args.train_images is not None:
        data = data.subset(args.train_images)
    print(f"{data}\ndevice: {_device_name(device)}, torch {torch.__version__}, native bf16: "
          f"{cpu_has_native_bf16() if device.type == 'cpu' else 'n/a'}", flush=True)
    floors = {prec: matmul_floor(device, args.batch_size, {"fp32": torch.float32, "bf16": torch.bfloat16}[prec],
                                 seconds_per_product=args.floor_seconds)
              for prec in sorted(set(precisions) | {"fp32"})}
    steps = math.ceil(data.train_x.shape[0] / args.batch_size)
    for prec, f in floors.items():
        print(f"matmul floor {prec}: {f['gflops']:.0f} GFLOP/s over the 5 products -> "
              f"{f['step_seconds'] * steps:.3f} s per epoch ({steps} steps)", flush=True)
    warm_up(data, args.batch_size, device, precisions)
    kw = dict(batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=device)
    runners = {"seed_style": SeedStyle(data, **kw)}
    for prec in precisions:
        runners[f"fastvae_{prec}"] = FastVAE(data, compile=args.compile, precision=prec,
                                             cuda_graph=not args.no_cuda_graph, **kw)
    logs = {name: {"epoch_seconds": [], "train_loss": [], "test_loss": []} for name in runners}
    names = list(runners)
    for epoch in range(args.epochs):
        # rotate which loop goes first, so a drift in the machine's speed hits all alike
        order = names[epoch % len(names):] + names[:epoch % len(names)]
        for name in order:
            train_loss, seconds = _timed(runners[name].epoch, device)
            log = logs[name]
            log["train_loss"].append(train_loss)
            log["epoch_seconds"].append(seconds)
            log["test_loss"].append(runners[name].test())
            print(f"{name:13s} epoch {epoch + 1}: train {train_loss:.2f}  test {log['test_loss'][-1]:.2f}  "
                  f"({seconds:.2f} s)", flush=True)
    seed_style = logs["seed_style"]
    s_mean = statistics.mean(seed_style["epoch_seconds"])
    fp32_floor = floors["fp32"]["step_seconds"] * steps
    result = {
        "benchmark": "train-epoch", "dataset": data.name, "n_train": data.train_x.shape[0],
        "n_test": data.test_x.shape[0], "model": "784-400-20", "batch_size": args.batch_size,
        "epochs": args.epochs, "device": _device_name(device), "torch": torch.__version__,
        "compile": args.compile, "cuda_graph": runners[f"fastvae_{precisions[0]}"].trainer.graph is not None,
        "native_bf16": cpu_has_native_bf16() if device.type == "cpu" else None,
        "matmul_floor": {prec: {**f, "epoch_seconds": f["step_seconds"] * steps} for prec, f in floors.items()},
        "seed_style": {**seed_style, "mean_epoch_seconds": s_mean,
                       "fraction_of_fp32_matmul_floor": fp32_floor / s_mean},
        "command": "python benchmarks/compare_train.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
    }
    print(f"\nseed-style loop (fp32): {s_mean:.2f} s/epoch, final test loss {seed_style['test_loss'][-1]:.2f}, "
          f"{fp32_floor / s_mean:.0%} of the fp32 matmul floor")
    for prec in precisions:
        log = logs[f"fastvae_{prec}"]
        mean = statistics.mean(log["epoch_seconds"])
        floor = floors[prec]["step_seconds"] * steps
        result[f"fastvae_{prec}"] = {
            **log, "mean_epoch_seconds": mean, "speedup": s_mean / mean,
            "test_loss_difference": log["test_loss"][-1] - seed_style["test_loss"][-1],
            f"fraction_of_{prec}_matmul_floor": floor / mean}
        r = result[f"fastvae_{prec}"]
        print(f"fastvae.train ({prec}): {mean:.2f} s/epoch, final test loss {log['test_loss'][-1]:.2f}: "
              f"{r['speedup']:.2f}x the seed-style loop, test loss {r['test_loss_difference']:+.2f} nats, "
              f"{floor / mean:.0%} of the {prec} matmul floor")
    out = Path(args.out) if args.out else RESULTS / f"train-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
