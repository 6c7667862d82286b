"""The direct launcher (kernels/launch.py) against Triton's own binder, on the stub libcuda.

    python -m benchmarks.launcher_oracle

For a kernel with tensor, integer, float and constexpr arguments, every call below goes through
``Launcher[grid](**kwargs)`` and ``launch(direct, ...)`` (a Static part and a dynamic part), and
each time the compiled kernel whose launcher ran must be the one Triton's own binder picks for
the same arguments (``kernel.warmup``): a different dtype, a misaligned tensor, an integer equal
to 1, a multiple of 16 or beyond 32 bits, another constexpr or another ``num_warps`` must each
reach their own specialization. Prints one line per call and exits 1 on any mismatch. Nothing
runs on a GPU: the stub's ``cuLaunchKernelEx`` only counts.
"""
from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.host_overhead import activate_stub, build_stub


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stub-dir", type=Path, default=Path.home() / ".cache" / "fastvae" / "stub-libcuda")
    args = p.parse_args(argv)
    try:
        activate_stub(build_stub(args.stub_dir))
    except Exception as e:  # noqa: BLE001 - no compiler or no triton: nothing to check here
        print(f"launcher_oracle: skipped: {e}", file=sys.stderr)
        return 3

    import torch
    import triton
    import triton.language as tl
    from triton.backends.nvidia.driver import CudaLauncher

    from fastvae.kernels.launch import Launcher, Static, launch

    @triton.jit
    def kernel(x_ptr, y_ptr, n, stride, scale, FLAG: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        v = tl.load(x_ptr + offs * stride, mask=m, other=0.0)
        if FLAG:
            v = v * scale
        tl.store(y_ptr + offs, v.to(y_ptr.dtype.element_ty), mask=m)

    used = []
    real_call = CudaLauncher.__call__

    def spy(self, *a, **k):
        used.append(self)
        return real_call(self, *a, **k)

    CudaLauncher.__call__ = spy
    f32 = torch.empty(4096, dtype=torch.float32)
    bf16 = torch.empty(4096, dtype=torch.bfloat16)
    calls = [
        dict(x_ptr=f32, y_ptr=f32, n=64, stride=1, scale=2.0, FLAG=True, BLOCK=64, num_warps=4),
        dict(x_ptr=f32, y_ptr=f32, n=64, stride=1, scale=3.0, FLAG=True, BLOCK=64, num_warps=4),
        dict(x_ptr=bf16, y_ptr=f32, n=64, stride=1, scale=2.0, FLAG=True, BLOCK=64, num_warps=4),
        dict(x_ptr=f32[1:], y_ptr=f32, n=64, stride=1, scale=2.0, FLAG=True, BLOCK=64, num_warps=4),
        dict(x_ptr=f32, y_ptr=f32, n=17, stride=1, scale=2.0, FLAG=True, BLOCK=64, num_warps=4),
        dict(x_ptr=f32, y_ptr=f32, n=1, stride=1, scale=2.0, FLAG=True, BLOCK=64, num_warps=4),
        dict(x_ptr=f32, y_ptr=f32, n=2**31 + 16, stride=1, scale=2.0, FLAG=True, BLOCK=64, num_warps=4),
        dict(x_ptr=f32, y_ptr=f32, n=64, stride=2, scale=2.0, FLAG=True, BLOCK=64, num_warps=4),
        dict(x_ptr=f32, y_ptr=f32, n=64, stride=1, scale=2.0, FLAG=False, BLOCK=64, num_warps=4),
        dict(x_ptr=f32, y_ptr=f32, n=64, stride=1, scale=2.0, FLAG=True, BLOCK=128, num_warps=4),
        dict(x_ptr=f32, y_ptr=f32, n=64, stride=1, scale=2.0, FLAG=True, BLOCK=64, num_warps=8),
    ]
    launcher = Launcher(kernel)
    statics: dict = {}
    bad = 0
    for round_ in range(3):  # the first round compiles; the later ones take the direct calls
        for i, kw in enumerate(calls):
            oracle = kernel.warmup(grid=(1,), **kw).run
            used.clear()
            launcher[(1,)](**kw)
            got = used[-1] if used else None
            used.clear()
            static_kw = {k: v for k, v in kw.items() if k not in ("x_ptr", "y_ptr", "scale")}
            # calls 0-3 share one Static: only their tensors' dtypes, alignment and scale differ
            static = statics.setdefault(tuple(sorted(static_kw.items())), Static(**static_kw))
            launch(lambda k: launcher, kernel, (1,), static, x_ptr=kw["x_ptr"], y_ptr=kw["y_ptr"],
                   scale=kw["scale"])
            got_static = used[-1] if used else None
            ok = got is oracle and got_static is oracle
            bad += not ok
            label = {k: (str(v.dtype), v.data_ptr() % 16) if isinstance(v, torch.Tensor) else v
                     for k, v in kw.items()}
            print(f"round {round_} call {i}: {'ok' if ok else 'MISMATCH'} {label}")
    print(f"{bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
