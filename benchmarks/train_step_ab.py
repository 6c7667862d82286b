"""The two CPU training-step shortcuts of ``fastvae.train``, each against what it replaces, in one
process with alternating blocks of 20 steps (so a drift in the machine's speed hits both sides):

* ``Trainer.step`` with the hand-written gradients of ``fastvae/_step.py`` against the same step
  through autograd (``FusedELBO`` + ``reparameterize`` + ``loss.backward()``);
* ``Trainer.optimizer_step`` (the fused Adam kernel called directly) against ``opt.step()`` +
  ``opt.zero_grad(set_to_none=True)``.

    python benchmarks/train_step_ab.py --dataset fashion-mnist

prints the median and quartiles of each, in ms per step.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastvae
from fastvae._step import vae_elbo_grads
from fastvae.training import Trainer


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--rounds", type=int, default=25, help="alternations of 20-step blocks (default 25)")
    args = p.parse_args(argv)
    x = fastvae.load_dataset(args.dataset, data_dir=args.data_dir).train_x
    cfg = {"batch_size": 128, "lr": 1e-3, "beta": 1.0, "seed": 0}
    trainer = Trainer(fastvae.VAE(x[0].numel(), 400, 20), cfg, torch.device("cpu"))
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    batches = perm[: (x.shape[0] // 128) * 128].view(-1, 128)
    count = [0]

    def batch():
        count[0] += 1
        return x.index_select(0, batches[count[0] % batches.shape[0]])

    def timed(sides: dict, before=None) -> dict:
        out = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, fn in sides.items():
                for _ in range(20):
                    xb = batch()
                    if before is not None:
                        before(xb)
                    t0 = time.perf_counter()
                    fn(xb)
                    out[name].append((time.perf_counter() - t0) * 1e3)
        return out

    def with_manual(flag: bool):
        def run(xb):
            trainer._manual = flag
            trainer.step(xb)
        return run

    def torch_optim(xb):
        trainer.opt.step()
        trainer.opt.zero_grad(set_to_none=True)

    for _ in range(30):  # warm-up (and the optimizer's state)
        trainer.step(batch())
    results = timed({"step, gradients by hand": with_manual(True), "step, autograd": with_manual(False)})
    trainer._manual = True
    results.update(timed({"optimizer_step": lambda xb: trainer.optimizer_step(),
                          "opt.step + zero_grad": torch_optim},
                         before=lambda xb: vae_elbo_grads(trainer.model, xb, 1.0, trainer.noise_gen)))
    print(f"{torch.get_num_threads()} torch threads, ATen CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; ms per step (median, quartiles):")
    summary = {}
    for name, v in results.items():
        q = statistics.quantiles(v)
        summary[name] = {"median": statistics.median(v), "q1": q[0], "q3": q[2]}
        print(f"  {name:26s} {summary[name]['median']:.3f}  ({q[0]:.3f}-{q[2]:.3f})")
    return summary


if __name__ == "__main__":
    main()
