"""The IWAE bound of log p(x) (K = 5000 by default) on Fashion-MNIST test images: the evaluator of
commit fc55d78 (``git show fc55d78:fastvae/evaluate.py``) against the streaming one, interleaved.

    python -m benchmarks.iwae_eval                         # 200 images, K = 5000, 1 and 2 threads
    python -m benchmarks.iwae_eval --images 1000 --threads 2 --checkpoint runs/fmnist/checkpoint.pt
    python -m benchmarks.iwae_eval --memory                # peak RSS for two values of K (subprocesses)
    python -m benchmarks.iwae_eval --train-table --images 500 --json benchmarks/results/iwae-train-cpu.json

Reports, per thread count: seconds per image and per sample for both, the speed-up, the projection
to the 10,000 test images, and a FLOP model of the decoder matmuls, ``2 (L H + H D)`` per sample,
as a fraction of the throughput of a plain single-threaded ``torch.mm`` of the decoder output
layer's shape [rows, H] x [H, D] times the thread count, measured in the same process (the floor:
the output layer's matmul alone).
Without ``--checkpoint`` the model is a freshly initialised 784-400-20 VAE (the time does not depend
on the weights). Both evaluators use the same model and images; their bounds agree to Monte-Carlo
error. ``--json`` writes the figures (default benchmarks/results/iwae-eval-cpu.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OLD_COMMIT = "fc55d78"


def old_evaluator():
    """The module fastvae/evaluate.py of commit fc55d78, loaded from git into fastvae's package."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:fastvae/evaluate.py"],
                         capture_output=True, text=True, check=True).stdout
    mod = types.ModuleType("fastvae._evaluate_fc55d78")
    mod.__package__ = "fastvae"
    exec(compile(src, f"{OLD_COMMIT}:fastvae/evaluate.py", "exec"), mod.__dict__)
    return mod


def load_model(checkpoint):
    import fastvae

    if checkpoint:
        model, _ = fastvae.load_checkpoint(checkpoint, map_location="cpu")
    else:
        torch.manual_seed(0)
        model = fastvae.VAE(784, 400, 20)
    return model.eval()


def fmnist_test_images(n):
    import fastvae

    data_dir = "/usr/share/datasets/fashion-mnist"
    data = fastvae.load_dataset("fashion-mnist", data_dir=data_dir if os.path.isdir(data_dir) else None)
    return data.test_x[:n], data.name


def mm_throughput(rows, H, D, seconds=2.0):
    """GFLOP/s of torch.mm [rows, H] x [H, D] (the output layer's shape), best of timed batches."""
    a, b = torch.randn(rows, H), torch.randn(H, D)
    out = torch.empty(rows, D)
    best = 0.0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(10):
            torch.mm(a, b, out=out)
        best = max(best, 10 * 2 * rows * H * D / (time.perf_counter() - t0) / 1e9)
    return best


def decoder_floor_us(rows, L, H, D, seconds=2.0):
    """Microseconds per sample of the least work any evaluator of the Bernoulli bound does in
    separate ATen ops, single-threaded, on a cache-sized chunk of ``rows`` samples: the decoder's
    two matmuls (z [rows, L] -> relu -> h [rows, H] -> logits [rows, D]) and one transcendental
    pass over the logits (softplus needs an exp or a log per logit), best of timed batches."""
    z, w1, w2 = torch.randn(rows, L), torch.randn(L, H), torch.randn(H, D)
    h, logits = torch.empty(rows, H), torch.empty(rows, D)
    best = float("inf")
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(10):
            torch.mm(z, w1, out=h).relu_()
            torch.mm(h, w2, out=logits).exp_()
        best = min(best, (time.perf_counter() - t0) / (10 * rows) * 1e6)
    return best


def run_new(model, x, K, seed):
    from fastvae.evaluate import iw_log_likelihood

    return iw_log_likelihood(model, x, K, torch.Generator().manual_seed(seed))


def run_old(old, model, x, K, seed):
    return old.iw_log_likelihood(model, x, K, torch.Generator().manual_seed(seed))


def time_pair(old, model, x, K, reps):
    """Interleaved old/new timings (seconds, best of ``reps``) and their mean bounds."""
    t_old, t_new = [], []
    ll_old = ll_new = None
    for r in range(reps):
        t0 = time.perf_counter()
        ll_old = run_old(old, model, x, K, r)
        t1 = time.perf_counter()
        ll_new = run_new(model, x, K, r)
        t2 = time.perf_counter()
        t_old.append(t1 - t0)
        t_new.append(t2 - t1)
    return min(t_old), min(t_new), ll_old.mean().item(), ll_new.mean().item()


def memory_child(which, K, n, checkpoint):
    """Run one evaluator in this (child) process; print the peak RSS growth in MiB as JSON."""
    torch.set_num_threads(1)
    model = load_model(checkpoint)
    x, _ = fmnist_test_images(n)
    old = old_evaluator() if which == "old" else None
    run_old(old, model, x, 1, 0) if old else run_new(model, x, 1, 0)     # warm: allocator, imports
    # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS, so the peak
    # of the evaluation alone is seen (loading the data set set a higher one)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    run_old(old, model, x, K, 0) if old else run_new(model, x, K, 0)
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    print(json.dumps({"which": which, "K": K, "images": n, "peak_rss_mib": peak / 1024,
                      "growth_mib": (peak - base) / 1024, "seconds": seconds}))


def _status_kib(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def train_table(args):
    """ELBO vs IWAE (K = 5, 50) training on a Fashion-MNIST subset, same epochs and seed, then the
    K = 5000 bound (and the one-sample test ELBO) of each on the same test images."""
    import fastvae
    from fastvae.evaluate import evaluate

    data_dir = "/usr/share/datasets/fashion-mnist"
    data = fastvae.load_dataset("fashion-mnist", data_dir=data_dir if os.path.isdir(data_dir) else None)
    data = data.subset(args.train_images, args.images)
    rows = []
    for objective, k in (("elbo", 1), ("iwae", 5), ("iwae", 50)):
        t0 = time.perf_counter()
        res = fastvae.train(data, epochs=args.epochs, objective=objective, train_samples=k, out_dir=None,
                            progress=False, figures=False, device="cpu", seed=1)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ev = evaluate(res.model, data, iw_samples=args.K, generator=torch.Generator().manual_seed(0))
        rows.append({"objective": objective, "train_samples": k, "epochs": args.epochs,
                     "train_images": args.train_images, "test_images": args.images, "train_seconds": train_s,
                     "final_train_loss": res.metrics["train_loss"][-1], "test_elbo": ev["elbo"],
                     "iw_samples": args.K, "iw_log_likelihood": ev["iw_log_likelihood"],
                     "eval_seconds": time.perf_counter() - t0, "loadavg": os.getloadavg()})
        print(json.dumps(rows[-1]), flush=True)
    print(f"| objective | K (train) | test ELBO | log p(x) bound, K={args.K} | train s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['objective']} | {r['train_samples']} | {r['test_elbo']:.2f} | {r['iw_log_likelihood']:.2f} | "
              f"{r['train_seconds']:.0f} |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200, help="Fashion-MNIST test images (default 200)")
    p.add_argument("--K", type=int, default=5000)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=2, help="interleaved repetitions (best of)")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--memory", action="store_true", help="peak RSS of both for K = 500 and 5000 (10 images)")
    p.add_argument("--json", default=str(HERE / "results" / "iwae-eval-cpu.json"))
    p.add_argument("--memory-child", nargs=2, metavar=("WHICH", "K"), help=argparse.SUPPRESS)
    p.add_argument("--train-table", action="store_true",
                   help="train ELBO, IWAE K=5 and K=50 on --train-images for --epochs, then the K bound "
                        "on --images test images (instead of the timing)")
    p.add_argument("--train-images", type=int, default=8000)
    p.add_argument("--epochs", type=int, default=5)
    args = p.parse_args(argv)
    if args.train_table:
        rows = train_table(args)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"hardware": _hw(), "rows": rows}, indent=2) + "\n")
            print(f"wrote {args.json}")
        return 0
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]), args.images, args.checkpoint)
        return 0

    from fastvae._backend import hardware_name

    model = load_model(args.checkpoint)
    x, name = fmnist_test_images(args.images)
    L, H, D = model.latent_dim, model.hidden_dim, model.input_dim
    flops = 2 * (L * H + H * D)
    old = old_evaluator()
    result = {"hardware": hardware_name(torch.device("cpu")), "cpu_count": os.cpu_count(),
              "loadavg_before": os.getloadavg(), "torch": torch.__version__, "python": platform.python_version(),
              "dataset": name, "images": x.shape[0], "K": args.K, "model": f"{D}-{H}-{L}",
              "checkpoint": args.checkpoint, "flops_per_sample": flops, "runs": []}
    from fastvae.iwae import chunk_shape

    for threads in args.threads:
        torch.set_num_threads(threads)
        rows = chunk_shape(1, args.K, D)[1]
        # the streaming evaluator runs single-threaded ops in `threads` workers: its matmul floor is
        # `threads` times one thread's torch.mm (a 2-thread torch.mm on a shared machine stalls)
        torch.set_num_threads(1)
        mm = threads * mm_throughput(rows, H, D)
        floor_us = decoder_floor_us(rows, L, H, D) / threads
        torch.set_num_threads(threads)
        t_old, t_new, ll_old, ll_new = time_pair(old, model, x, args.K, args.reps)
        samples = x.shape[0] * args.K
        run = {"threads": threads, "old_s": t_old, "new_s": t_new, "speedup": t_old / t_new,
               "old_us_per_sample": t_old / samples * 1e6, "new_us_per_sample": t_new / samples * 1e6,
               "old_10k_projection_s": t_old / x.shape[0] * 10000, "new_10k_projection_s": t_new / x.shape[0] * 10000,
               "bound_old": ll_old, "bound_new": ll_new, "mm_rows": rows, "mm_gflops": mm,
               "new_decoder_gflops": samples * flops / t_new / 1e9, "old_decoder_gflops": samples * flops / t_old / 1e9}
        run["new_fraction_of_mm"] = run["new_decoder_gflops"] / mm
        # the most any evaluator made of separate ATen ops could gain over the old one
        run["floor_us_per_sample"] = floor_us
        run["max_speedup_at_floor"] = run["old_us_per_sample"] / floor_us
        run["old_fraction_of_mm"] = run["old_decoder_gflops"] / mm
        run["loadavg_after"] = os.getloadavg()
        result["runs"].append(run)
        print(f"{threads} thread(s): old {t_old:.1f} s ({run['old_us_per_sample']:.2f} us/sample), new {t_new:.1f} s "
              f"({run['new_us_per_sample']:.2f} us/sample): {run['speedup']:.2f}x; 10k images: old "
              f"{run['old_10k_projection_s'] / 60:.1f} min, new {run['new_10k_projection_s'] / 60:.1f} min; "
              f"decoder {run['new_decoder_gflops']:.1f} GFLOP/s = {run['new_fraction_of_mm']:.0%} of torch.mm's "
              f"{mm:.1f} (old {run['old_fraction_of_mm']:.0%}); floor (2 matmuls + 1 exp pass) "
              f"{floor_us:.2f} us/sample = at most {run['max_speedup_at_floor']:.2f}x over old; "
              f"bounds {ll_old:.2f} / {ll_new:.2f}; "
              f"load {run['loadavg_after'][0]:.2f}", flush=True)
    if args.memory:
        mem = []
        for which in ("old", "new"):
            for K in (500, 5000):
                out = subprocess.run([sys.executable, "-m", "benchmarks.iwae_eval", "--images", "10",
                                      "--memory-child", which, str(K)]
                                     + (["--checkpoint", args.checkpoint] if args.checkpoint else []),
                                     cwd=ROOT, capture_output=True, text=True, check=True).stdout
                mem.append(json.loads(out.strip().splitlines()[-1]))
                print(f"peak RSS growth, {which}, K={K}: {mem[-1]['growth_mib']:.1f} MiB "
                      f"(peak {mem[-1]['peak_rss_mib']:.0f} MiB)", flush=True)
        result["memory"] = mem
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _hw():
    from fastvae._backend import hardware_name

    return hardware_name(torch.device("cpu"))


if __name__ == "__main__":
    sys.exit(main())
