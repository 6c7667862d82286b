"""The CPU fallback against eager and torch.compile, interleaved in one process, per ATen dispatch
level and thread count: the measurement behind the CPU goals (elbo-full, fp32, 784 features,
latent 20, forward + backward).

    python benchmarks/cpu_fallback.py                                  # avx2 and avx512, 1 and 2 threads
    python benchmarks/cpu_fallback.py --levels avx2 --threads 1 --sizes 4096
    python benchmarks/cpu_fallback.py --likelihood cb       # or gaussian (sigma = 0.5)
    python benchmarks/cpu_fallback.py --thp                 # huge pages for eager and compile too

For ``--likelihood gaussian`` / ``cb`` the providers are ``fastvae.baselines``' eager losses
(torch.distributions ``log_prob``), ``torch.compile`` of their validation-free forms, and fastvae.

Each (level, threads) runs in its own subprocess with ``ATEN_CPU_CAPABILITY`` set (it must be set
before torch is imported); levels the CPU lacks are skipped. Within a process the providers take
turns call by call, so other load on the machine hits them alike, in an order that changes each
round (a Williams design: each comes right after every other equally often). A call's page faults
depend on what the call before it freed: on this project's 2-core EPYC (B = 4096, 1 thread,
median of 15), in the fixed order eager, compile, fastvae, fastvae took 3,104 minor faults per
call and 26.6 ms, compile none and 21.1 ms; each alone in a loop, fastvae took none and 18.2 ms,
compile 3,104 and 25.3 ms. Reported per provider: the median and the minimum wall time, the median
minor page faults per call (``f``; 0 where ``resource`` is missing), and the speed-ups of fastvae
over eager and over compile.

``floor`` is the memory traffic no implementation can skip, fused or not: one pass that reads
recon and x and writes a new d recon (``torch.sub`` into a new [B, N] tensor, with ATen's threads:
a fresh buffer, as each call's gradient is, advised for huge pages as fastvae's own buffers are,
so that its page faults are the fewest any implementation pays), and nothing else: no
transcendental, no row sums, no KL, no autograd. ``compile / floor`` is the most any
implementation could gain over ``torch.compile``. (Before the fused loops the floor was a lower
bound for formulations made of separate ATen ops; the fallback's loops now run below it.)

Each fresh 4 KB page of a buffer is a page fault. fastvae advises its large gradient buffers for
2 MB pages (``fastvae/_memory.py``); eager and ``torch.compile`` get ATen's buffers, which fault
page by page unless ``THP_MEM_ALLOC_ENABLE=1`` asks PyTorch to advise every allocation of 2 MB and
more. ``--thp`` sets it in the children, so that all providers run with huge pages.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

try:
    import resource
except ImportError:  # not on Windows
    resource = None

if __package__:
    from .levels import level_env
else:  # run as a script (python benchmarks/cpu_fallback.py): its folder is on sys.path
    from levels import level_env

FEATURES, LATENT = 784, 20


def _floor(r, x):
    """The memory traffic no implementation can skip (see the module docstring): one pass that
    reads recon and x and writes a new d recon [B, N], with ATen's threads."""
    import torch

    from fastvae import _memory

    return torch.sub(r, x, out=_memory.empty(r.shape, r.dtype))


def _rotation(names: list, i: int) -> list:
    """The providers' order in round ``i``: row ``i`` of a Williams design, so that over
    ``len(names)`` rounds (twice that for an odd count) each provider comes right after every
    other equally often within a round. Row 0 is 0, 1, n-1, 2, n-2, ...; row r adds r mod n;
    for an odd n the reversed rows follow."""
    n = len(names)
    first = [0]
    lo, hi = 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    rows = n if n % 2 == 0 else 2 * n
    r = i % rows
    order = [(k + r) % n for k in first]
    if r >= n:
        order = order[::-1]
    return [names[k] for k in order]


def _minor_faults() -> int:
    """This process's minor page faults so far (0 where ``resource`` is missing, e.g. Windows)."""
    return 0 if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _child(sizes, rounds_budget, likelihood="bernoulli"):
    import functools

    import torch

    import fastvae
    from fastvae import baselines

    eager, traced, kw = {
        "bernoulli": (baselines.eager_elbo, baselines.logits_elbo, {}),
        "gaussian": (functools.partial(baselines.eager_gaussian_elbo, sigma=0.5),
                     functools.partial(baselines.gaussian_elbo, sigma=0.5),
                     dict(likelihood="gaussian", sigma=0.5)),
        "cb": (baselines.eager_cb_elbo, baselines.cb_elbo, dict(likelihood="continuous_bernoulli")),
    }[likelihood]
    compiled = torch.compile(traced, dynamic=False)

    def fastvae_loss(r, x, m, v):
        return fastvae.elbo_loss(r, x, m, v, backend="torch", **kw)

    providers = {"eager": eager, "compile": compiled, "fastvae": fastvae_loss, "floor": None}
    cap = torch.backends.cpu.get_cpu_capability()
    results = {}
    for B in sizes:
        g = torch.Generator().manual_seed(1000 + B)
        inputs = (2.0 * torch.randn(B, FEATURES, generator=g), torch.rand(B, FEATURES, generator=g),
                  torch.randn(B, LATENT, generator=g), 0.5 * torch.randn(B, LATENT, generator=g))

        def call(name):
            if name == "floor":
                return _floor(inputs[0], inputs[1])
            r, x, m, v = inputs
            leaves = [t.detach().requires_grad_() for t in (r, m, v)]
            loss = providers[name](leaves[0], x, leaves[1], leaves[2])
            return torch.autograd.grad(loss, leaves)

        first = {}
        for name in providers:  # warm-up; compile compiles here
            t0 = time.perf_counter()
            call(name)
            first[name] = time.perf_counter() - t0
        one = sum(first[n] for n in providers if n != "compile")
        rounds = max(5, min(200, int(rounds_budget / max(one, 1e-6))))
        times = {name: [] for name in providers}
        faults = {name: [] for name in providers}
        for i in range(rounds):
            for name in _rotation(list(providers), i):
                f0, t0 = _minor_faults(), time.perf_counter()
                call(name)
                times[name].append(time.perf_counter() - t0)
                faults[name].append(_minor_faults() - f0)
        med = {n: statistics.median(t) for n, t in times.items()}
        mn = {n: min(t) for n, t in times.items()}
        flt = {n: statistics.median(f) for n, f in faults.items()}
        cells = " ".join(f"{n}={med[n] * 1e3:.3f}/{mn[n] * 1e3:.3f}ms({flt[n]:.0f}f)" for n in providers)
        floor_txt = (f"floor vs eager {med['eager'] / med['floor']:.2f}x, vs compile "
                     f"{med['compile'] / med['floor']:.2f}x; ")
        thp = " THP_MEM_ALLOC_ENABLE=1" if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" else ""
        print(f"{likelihood} {cap}{thp} threads={torch.get_num_threads()} B={B} rounds={rounds} "
              f"(median/min, median minor page faults per call) {cells} | "
              f"fastvae vs eager {med['eager'] / med['fastvae']:.2f}x (min {mn['eager'] / mn['fastvae']:.2f}x), "
              f"vs compile {med['compile'] / med['fastvae']:.2f}x (min {mn['compile'] / mn['fastvae']:.2f}x); "
              f"{floor_txt}fastvae first call {first['fastvae'] * 1e3:.1f} ms", flush=True)
        results[B] = {"rounds": rounds, "median": med, "min": mn, "first": first, "faults": flt}
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="avx2,avx512", help="ATen CPU dispatch levels (comma-separated)")
    p.add_argument("--threads", default="1,2", help="torch thread counts (comma-separated)")
    p.add_argument("--sizes", default="128,4096,65536", help="batch sizes (comma-separated)")
    p.add_argument("--budget", type=float, default=10.0, help="seconds of timed calls per size (about)")
    p.add_argument("--likelihood", default="bernoulli", choices=("bernoulli", "gaussian", "cb"),
                   help="decoder likelihood (default: bernoulli)")
    p.add_argument("--thp", action="store_true",
                   help="THP_MEM_ALLOC_ENABLE=1: huge pages for every provider's large buffers")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.child:
        import torch
        torch.set_num_threads(int(os.environ["FASTVAE_THREADS"]))
        _child(sizes, args.budget, args.likelihood)
        return 0
    rc = 0
    for level in args.levels.split(","):
        for n in args.threads.split(","):
            env = dict(level_env(level), FASTVAE_THREADS=n)  # an Inductor cache per level
            if args.thp:
                env["THP_MEM_ALLOC_ENABLE"] = "1"
            r = subprocess.run([sys.executable, __file__, "--child", "--sizes", args.sizes,
                                "--budget", str(args.budget), "--likelihood", args.likelihood],
                               env=env).returncode
            if r == -4 or r == 132:  # SIGILL: the CPU lacks this level's instructions
                print(f"{level} threads={n}: this CPU cannot run ATEN_CPU_CAPABILITY={level}; skipped")
            elif r:
                rc = r
    return rc


if __name__ == "__main__":
    sys.exit(main())
