"""Host time of one call on the Triton path through Triton's real NVIDIA launcher, without a GPU.

    python -m benchmarks.host_overhead [--batch 128] [--calls 2000] [--repeats 15] [--json FILE]

What a GPU user pays per call before any kernel runs: fastvae's Python, autograd, and Triton's
launch path (``CompiledKernel.run``, ``CudaLauncher``, the C launcher's argument extraction),
here built against a do-nothing ``libcuda.so.1`` (``benchmarks/stub_libcuda/stub.c``, compiled
into a cache folder on first use; a C compiler is needed) whose ``cuLaunchKernelEx`` only counts.
Kernels compile for sm_90 with the ``ptxas`` of the triton wheel; nothing is executed, and the
tensors are CPU tensors. Not included: the CUDA driver's own launch cost, the CUDA caching
allocator, current-device/stream lookups (constants here).

Each case runs in one process, interleaved with the others (``--repeats`` rounds of ``--calls``
calls each; medians of the rounds), in thread CPU time and wall time:

* fastvae's four public calls at B x 784 (latent 20): ``elbo_loss`` forward and forward +
  backward, ``reparameterize`` forward and forward + backward, with the launches each makes;
* the same calls with every kernel launch replaced by a no-op (what the calls cost without
  Triton's launcher): the difference, per launch, is Triton's own cost;
* eager PyTorch's seed loss (``fastvae.baselines.eager_elbo``) and reparameterisation formula on
  [1, 8] tensors, where the arithmetic is negligible: what ATen's dispatch and autograd cost per
  call on this host (a GPU adds each op's CUDA launch on top);
* the floors: ``CompiledKernel.run`` of the ELBO kernel called directly (Triton's launcher with
  nothing of fastvae around it) and an ``autograd.Function`` that does nothing, forward +
  backward on the ELBO's inputs (autograd's own cost).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STUB_SOURCE = HERE / "stub_libcuda" / "stub.c"
CASES = ("elbo-fwd", "elbo-full", "reparam-fwd", "reparam-full")


def build_stub(cache: Path) -> Path:
    """The stub's folder (libcuda.so.1 built from STUB_SOURCE with the triton wheel's cuda.h),
    rebuilt when the source changes; a RuntimeError without a C compiler."""
    import importlib.util

    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc or gcc) to build the stub libcuda")
    spec = importlib.util.find_spec("triton")  # not imported: the stub driver goes in first
    if spec is None or spec.origin is None:
        raise RuntimeError("triton is not installed")
    include = Path(spec.origin).parent / "backends" / "nvidia" / "include"
    lib = cache / "libcuda.so.1"
    if not lib.exists() or lib.stat().st_mtime < STUB_SOURCE.stat().st_mtime:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f"libcuda.so.1.{os.getpid()}"
        # the soname lets Triton's launcher module, linked against libcuda.so.1, bind to it once loaded
        subprocess.run([cc, "-shared", "-fPIC", "-O2", f"-I{include}", "-Wl,-soname,libcuda.so.1",
                        "-o", str(tmp), str(STUB_SOURCE)], check=True)
        tmp.replace(lib)
    return cache


def activate_stub(folder: Path):
    """Load the stub and make Triton's real CUDA driver, built against it, the active one (before
    fastvae defines its kernels). Returns the stub's ctypes handle."""
    import warnings

    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_LIBCUDA_PATH"] = str(folder)
    # torch finds the stub too and says the "driver" is too old for CUDA: true, and beside the point
    warnings.filterwarnings("ignore", message="CUDA initialization")
    stub = ctypes.CDLL(str(folder / "libcuda.so.1"), mode=ctypes.RTLD_GLOBAL)
    stub.stub_launch_count.restype = ctypes.c_ulonglong
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    class StubCudaDriver(CudaDriver):
        def __init__(self):
            super().__init__()  # compiles Triton's driver.c, linked to the stub
            # torch's current CUDA device and stream cannot be asked for without CUDA: constants
            self.get_current_device = lambda: 0
            self.get_current_stream = lambda idx=None: 0
            self.get_device_capability = lambda idx=None: (9, 0)

        @staticmethod
        def is_active():
            return True

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    triton.runtime.driver.set_active(StubCudaDriver())
    return stub


def _cases(batch: int):
    import torch

    import fastvae
    from fastvae.baselines import eager_elbo

    g = torch.Generator().manual_seed(0)
    recon = torch.randn(batch, 784, generator=g, requires_grad=True)
    x = torch.rand(batch, 784, generator=g)
    mu = torch.randn(batch, 20, generator=g, requires_grad=True)
    logvar = torch.randn(batch, 20, generator=g, requires_grad=True)
    ones = torch.ones(batch, 20)
    r1, x1 = torch.randn(1, 8, generator=g, requires_grad=True), torch.rand(1, 8, generator=g)
    m1, v1 = torch.randn(1, 8, generator=g, requires_grad=True), torch.randn(1, 8, generator=g, requires_grad=True)
    ones1 = torch.ones(1, 8)

    def eager_reparam():
        return m1 + torch.exp(0.5 * v1) * torch.randn_like(m1)

    fastvae_cases = {
        "elbo-fwd": lambda: fastvae.elbo_loss(recon.detach(), x, mu.detach(), logvar.detach(), backend="triton"),
        "elbo-full": lambda: torch.autograd.grad(fastvae.elbo_loss(recon, x, mu, logvar, backend="triton"),
                                                 (recon, mu, logvar)),
        "reparam-fwd": lambda: fastvae.reparameterize(mu.detach(), logvar.detach(), backend="triton"),
        "reparam-full": lambda: torch.autograd.grad(fastvae.reparameterize(mu, logvar, backend="triton"),
                                                    (mu, logvar), ones),
    }
    eager_cases = {
        "elbo-fwd": lambda: eager_elbo(r1.detach(), x1, m1.detach(), v1.detach()),
        "elbo-full": lambda: torch.autograd.grad(eager_elbo(r1, x1, m1, v1), (r1, m1, v1)),
        "reparam-fwd": lambda: m1.detach() + torch.exp(0.5 * v1.detach()) * torch.randn_like(m1),
        "reparam-full": lambda: torch.autograd.grad(eager_reparam(), (m1, v1), ones1),
    }

    grads = (torch.zeros_like(recon), torch.zeros_like(mu), torch.zeros_like(logvar))

    class Nothing(torch.autograd.Function):  # hands over gradients that exist already
        @staticmethod
        def forward(ctx, a, b, c, d):
            return a.new_empty(())

        @staticmethod
        def backward(ctx, grad):
            return grads[0], None, grads[1], grads[2]

    floors = {"autograd-function": lambda: torch.autograd.grad(Nothing.apply(recon, x, mu, logvar),
                                                               (recon, mu, logvar))}
    return fastvae_cases, eager_cases, floors


def _compiled_run_floor(batch: int):
    """A call of the ELBO kernel's CompiledKernel.run with its arguments bound: Triton's launcher
    with nothing of fastvae around it."""
    import torch

    from fastvae.kernels import elbo as E
    from fastvae.kernels.launch import fresh_scratch

    recon, x = torch.randn(batch, 784), torch.rand(batch, 784)
    mu, logvar = torch.randn(batch, 20), torch.randn(batch, 20)
    cfg = E.ELBOConfig(likelihood="bernoulli", from_logits=True, reduction="sum", grad=True, terms=False)
    seen = {}

    class Capture:  # records the launch's arguments, then launches through Triton once
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def go(**kwargs):
                seen.update(grid=grid, kwargs=kwargs, compiled=self.kernel[grid](**kwargs))
            return go

    E.elbo_forward(Capture, recon, x, mu, logvar, None, cfg, fresh_scratch)
    k, grid = seen["compiled"], seen["grid"]
    args = [seen["kwargs"][p.name] for p in k.src.fn.params]
    run, function, metadata = k.run, k.function, k.packed_metadata
    return lambda: run(grid[0], 1, 1, 0, function, metadata, None, None, None, *args)


def _time(fn, calls: int) -> tuple[float, float]:
    t0, w0 = time.thread_time(), time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.thread_time() - t0) / calls * 1e6, (time.perf_counter() - w0) / calls * 1e6


def measure(batch: int, calls: int, repeats: int, stub) -> dict:
    import torch

    from fastvae import _backend
    from fastvae.kernels import launch

    # the benchmark's CPU tensors take the Triton path (the kernels are compiled for sm_90 and
    # launched into the stub; nothing runs)
    _backend.interpreter_enabled = lambda: True
    ours, eager, floors = _cases(batch)
    floors["compiled-run"] = _compiled_run_floor(batch)
    real = (launch.Launcher.launch, launch.Launcher.launch_static)

    def no_launch(fn):
        def call():
            launch.Launcher.launch = lambda self, grid, kwargs: None
            launch.Launcher.launch_static = lambda self, grid, static, dynamic, made=(): None
            try:
                return fn()
            finally:
                launch.Launcher.launch, launch.Launcher.launch_static = real
        return call

    timed = {**{f"fastvae {k}": f for k, f in ours.items()},
             **{f"no-launch {k}": no_launch(f) for k, f in ours.items()},
             **{f"eager {k}": f for k, f in eager.items()},
             **{f"floor {k}": f for k, f in floors.items()}}
    launches = {}
    for name, fn in timed.items():  # warm-up: compiles every kernel, fills the caches
        n0 = stub.stub_launch_count()
        for _ in range(50):
            fn()
        launches[name] = (stub.stub_launch_count() - n0) / 50
    cpu = {name: [] for name in timed}
    wall = {name: [] for name in timed}
    for _ in range(repeats):  # interleaved rounds
        for name, fn in timed.items():
            c, w = _time(fn, calls)
            cpu[name].append(c)
            wall[name].append(w)
    rows = {name: dict(cpu_us=statistics.median(cpu[name]), wall_us=statistics.median(wall[name]),
                       launches=launches[name]) for name in timed}
    out = dict(batch=batch, calls=calls, repeats=repeats, torch=torch.__version__,
               threads=torch.get_num_threads(), aten_level=torch.backends.cpu.get_cpu_capability(),
               cpu=_backend.hardware_name(torch.device("cpu")), rows=rows)
    import triton

    out["triton"] = triton.__version__
    return out


def report(res: dict) -> str:
    r = res["rows"]
    lines = [f"fastvae host time per call through Triton's real launcher (stub libcuda), B={res['batch']} "
             f"x 784, latent 20; {res['cpu']}, ATen {res['aten_level']}, {res['threads']} thread(s), "
             f"torch {res['torch']}, triton {res['triton']}; medians of {res['repeats']} x "
             f"{res['calls']} calls, thread CPU time (wall)",
             f"{'case':14s} {'launches':>8s} {'fastvae':>17s} {'eager PyTorch':>17s} {'ratio':>6s} "
             f"{'per launch':>11s}"]
    for case in CASES:
        f, e, n = r[f"fastvae {case}"], r[f"eager {case}"], r[f"no-launch {case}"]
        per = (f["cpu_us"] - n["cpu_us"]) / f["launches"] if f["launches"] else float("nan")
        lines.append(f"{case:14s} {f['launches']:8.0f} {f['cpu_us']:8.1f} ({f['wall_us']:5.1f}) us "
                     f"{e['cpu_us']:8.1f} ({e['wall_us']:5.1f}) us {f['cpu_us'] / e['cpu_us']:5.2f}x "
                     f"{per:8.1f} us")
    lines.append(f"floors: CompiledKernel.run {r['floor compiled-run']['cpu_us']:.1f} us; an empty "
                 f"autograd.Function forward + backward {r['floor autograd-function']['cpu_us']:.1f} us")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--stub-dir", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                   / "fastvae" / "stub-libcuda", help="where the stub libcuda is built")
    args = p.parse_args(argv)
    if "fastvae" in sys.modules or "triton" in sys.modules:
        raise RuntimeError("run host_overhead in a fresh process: the stub driver goes in before triton")
    try:
        stub = activate_stub(build_stub(args.stub_dir))
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        print(f"host_overhead: skipped: {e}", file=sys.stderr)
        return 3
    res = measure(args.batch, args.calls, args.repeats, stub)
    print(report(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
