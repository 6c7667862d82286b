"""Static sm_90 (H100) report of fastvae's Triton kernels, made without a GPU.

    python -m benchmarks.sm90_report                      # print the table, write the JSON
    python -m benchmarks.sm90_report --json PATH          # the JSON to PATH
    python -m benchmarks.sm90_report --markdown           # also rewrite the table in benchmarks/README.md

It runs fastvae's public API (``fastvae.elbo_loss``, ``fastvae.reparameterize`` and their
backward) on CPU tensors with ``fastvae._triton_ops.wrap_triton`` and the eager launcher
``_direct`` replaced by a recorder, so every kernel launch of every variant is captured (kernel,
grid, arguments) and nothing runs. Each captured launch is then compiled for sm_90 through the
JITFunction's own path (``kernel.run(..., warmup=True)``) with a fake active Triton driver whose
target is ``GPUTarget("cuda", 90, 32)``: the specialisation (16-byte divisibility of pointers and integers,
integers equal to 1) is the one a GPU launch with these shapes gets. Identical compiled kernels
(same hash) are reported once.

Per kernel variant: registers per thread and spills (``ptxas -v`` on the kernel's PTX with the
flags Triton uses, checked against the cubin's own resource usage from ``cuobjdump -res-usage``),
shared memory (Triton's metadata), num_warps, theoretical occupancy on sm_90, global loads/stores
by vector width per tensor argument (from the PTX: each ``ld.global``/``st.global`` is attributed
to the pointer argument its address is computed from), 128-bit LDG/STG in the SASS
(``cuobjdump -sass``), and SASS instructions per element of the main loop:

* **main loop**: the SASS loop (a backward branch ``BRA`` and its target) holding the most global
  loads/stores; the whole kernel if no loop holds any;
* **elements per thread per iteration**: the most elements one thread accesses in one tensor
  argument in the PTX (the PTX holds each loop body once), e.g. 16 fp32 of recon;
* **SASS/elem** = instructions in the main loop / elements per thread per iteration.

Occupancy (sm_90: 65536 registers, 64 warps, 32 blocks and 228 KB shared memory per SM, 1 KB of
it reserved per block; registers allocated per warp in units of 256) = resident warps / 64.

Nothing here needs a GPU or CUDA. Where triton's NVIDIA backend, ``ptxas`` or ``cuobjdump`` is
missing, the JSON says why in ``skipped`` (or the SASS fields are null) and the exit status is 0.
TRITON_INTERPRET must be off (the kernels must be JITFunctions): it is removed from the
environment before fastvae is imported.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "sm90-static.json"
README = HERE / "README.md"
START = "<!-- sm90-report:start -->"
END = "<!-- sm90-report:end -->"
SECTION = "## Static sm_90 report (no GPU needed)"

# realistic shapes: Fashion-MNIST pixels, a 20-d latent, a large training batch
B, N, L = 4096, 784, 20

# sm_90 (H100) limits per SM
SM90 = dict(regs=65536, warps=64, blocks=32, smem=228 * 1024, smem_reserved_per_block=1024,
            reg_alloc_unit=256, max_regs_per_thread=255)


# --------------------------------------------------------------------------------------------
# the fake driver
# --------------------------------------------------------------------------------------------

def nvidia_tools():
    """(ptxas path, cuobjdump path or None), or raise RuntimeError with the reason."""
    import triton
    from triton.backends import backends

    if "nvidia" not in backends:
        raise RuntimeError(f"triton {triton.__version__} has no NVIDIA backend (backends: {sorted(backends)})")
    from triton import knobs

    try:
        ptxas = knobs.nvidia.ptxas.path
    except Exception as e:  # noqa: BLE001 - any failure to find it is a reason to skip
        raise RuntimeError(f"triton's ptxas is not available: {e}") from e
    if not ptxas or not os.path.exists(ptxas):
        raise RuntimeError(f"triton's ptxas is not available (looked for {ptxas!r})")
    cuobjdump = None
    try:
        cuobjdump = knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001
        cuobjdump = shutil.which("cuobjdump")
    if cuobjdump and not os.path.exists(cuobjdump):
        cuobjdump = None
    return ptxas, cuobjdump


def make_fake_driver(arch: int = 90):
    """A Triton driver with no device behind it whose target is ``GPUTarget("cuda", arch, 32)``:
    enough for the JIT to specialise and compile (not to launch)."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class FakeCudaDriver(DriverBase):
        def __init__(self):
            super().__init__()
            self.target = GPUTarget("cuda", arch, 32)

        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError("the fake sm_90 driver cannot launch")

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError("the fake sm_90 driver cannot launch")

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_device_capability(self, device=None):
            return (arch // 10, arch % 10)

    return FakeCudaDriver()


def activate_fake_driver(arch: int = 90):
    from triton.runtime import driver

    drv = make_fake_driver(arch)
    driver.set_active(drv)
    return drv


# --------------------------------------------------------------------------------------------
# capturing launches through the public API
# --------------------------------------------------------------------------------------------

class Launch:
    def __init__(self, kernel, grid, args, kwargs, call, labels):
        self.kernel, self.grid, self.args, self.kwargs = kernel, grid, args, kwargs
        self.call = call          # which public call produced it
        self.labels = labels      # data_ptr -> role name, filled in after the call


def _import_fastvae():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        os.environ.pop("TRITON_INTERPRET")
    import fastvae
    from fastvae import _backend, _triton_ops

    if _triton_ops.KERNELS_INTERPRETED:
        raise RuntimeError("fastvae's kernels were defined under TRITON_INTERPRET=1; run this in a fresh "
                           "process without it")
    return fastvae, _backend, _triton_ops


def _aligned(t):
    assert t.data_ptr() % 16 == 0, "CPU allocations are expected to be 16-byte aligned"
    return t


def _role_hook(roles, name):
    def hook(grad):
        roles.setdefault(grad.data_ptr(), name)  # the gradient the backward op returned
    return hook


def capture_launches():
    """Every kernel launch of every variant the public API makes at (B, N, L); nothing runs."""
    import torch

    fastvae, _backend, _triton_ops = _import_fastvae()
    launches: list[Launch] = []
    current = {}

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def record(*args, **kwargs):
                launches.append(Launch(self.kernel, grid, args, kwargs, current["call"], current["roles"]))
            return record

    saved = (_triton_ops.wrap_triton, _triton_ops._direct, _backend.interpreter_enabled)
    _triton_ops.wrap_triton = _triton_ops._direct = Recorder  # the ops' launcher and the eager one
    _backend.interpreter_enabled = lambda: True  # let backend="triton" take CPU tensors
    gen = torch.Generator().manual_seed(0)
    try:
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        # ---- ELBO
        def elbo_call(dname, dt, xkind, likelihood, from_logits, reduction, mode, sigma=None, free_bits=0.0):
            recon = _aligned(torch.empty(B, N, dtype=dt))
            x = _aligned(torch.empty(B, N, dtype=dt) if xkind == "float"
                         else torch.empty(B, N, dtype=torch.uint8))
            mu = _aligned(torch.empty(B, L, dtype=dt))
            lv = _aligned(torch.empty(B, L, dtype=dt))
            grad = mode != "no_grad"
            for t in (recon, mu, lv):
                t.requires_grad_(grad)
            x.requires_grad_(mode == "x_grad")
            roles = {recon.data_ptr(): "recon", x.data_ptr(): "x", mu.data_ptr(): "mu",
                     lv.data_ptr(): "logvar"}
            if sigma == "tensor":  # a learned per-pixel sigma
                sigma = _aligned(torch.empty(N, dtype=dt)).requires_grad_(grad)
                roles[sigma.data_ptr()] = "sigma"
            if grad:
                for name, t in (("d_recon", recon), ("d_x", x), ("d_mu", mu), ("d_logvar", lv),
                                ("d_sigma", sigma)):
                    if isinstance(t, torch.Tensor) and t.requires_grad:
                        t.register_hook(_role_hook(roles, name))
            lik = likelihood if likelihood != "bernoulli" else ("logits" if from_logits else "probs")
            extra = (" sigma=tensor" if isinstance(sigma, torch.Tensor) else "") + (
                f" free_bits={free_bits}" if free_bits else "")
            call = (f"elbo {dname} x={'uint8' if xkind == 'uint8' else dname} {lik} {reduction} "
                    f"{mode}{extra}")
            current.update(call=call, roles=roles)
            with torch.set_grad_enabled(grad):
                loss = fastvae.elbo_loss(recon, x, mu, lv, reduction=reduction, beta=1.0,
                                         likelihood=likelihood, sigma=sigma, free_bits=free_bits,
                                         from_logits=from_logits, backend="triton")
            roles[loss.data_ptr()] = "loss"
            if grad:
                g = _aligned(torch.ones_like(loss))
                roles[g.data_ptr()] = "grad_out"
                loss.backward(g)
            current["keep"] = current.get("keep", []) + [recon, x, mu, lv, loss, sigma]

        for dname, dt in dtypes.items():
            for xkind in ("float", "uint8"):
                for from_logits in (True, False):
                    for reduction in ("sum", "batchmean", "none"):
                        for mode in ("no_grad", "grad", "x_grad"):
                            if mode == "x_grad" and xkind == "uint8":
                                continue
                            elbo_call(dname, dt, xkind, "bernoulli", from_logits, reduction, mode)
            # the other likelihoods, free bits and a learned sigma (each with the flat and the row tiling)
            for reduction in ("sum", "none"):
                for mode in ("no_grad", "grad", "x_grad"):
                    elbo_call(dname, dt, "float", "gaussian", True, reduction, mode, sigma=0.5)
                    elbo_call(dname, dt, "float", "continuous_bernoulli", True, reduction, mode)
                elbo_call(dname, dt, "float", "gaussian", True, reduction, "grad", sigma="tensor")
                elbo_call(dname, dt, "float", "bernoulli", True, reduction, "grad", free_bits=0.5)
        # ---- reparameterize
        for dname, dt in dtypes.items():
            for has_eps in (True, False):
                for mode in ("no_grad", "grad", "eps_grad"):
                    if mode == "eps_grad" and not has_eps:
                        continue
                    mu = _aligned(torch.empty(B, L, dtype=dt))
                    lv = _aligned(torch.empty(B, L, dtype=dt))
                    eps = _aligned(torch.empty(B, L, dtype=dt)) if has_eps else None
                    grad = mode != "no_grad"
                    mu.requires_grad_(grad)
                    lv.requires_grad_(grad)
                    if eps is not None:
                        eps.requires_grad_(mode == "eps_grad")
                    roles = {mu.data_ptr(): "mu", lv.data_ptr(): "logvar"}
                    if eps is not None:
                        roles[eps.data_ptr()] = "eps"
                    for name, t in (("d_mu", mu), ("d_logvar", lv), ("d_eps", eps)):
                        if t is not None and t.requires_grad:
                            t.register_hook(_role_hook(roles, name))
                    call = f"reparam {dname} {'eps' if has_eps else 'drawn'} {mode}"
                    current.update(call=call, roles=roles)
                    with torch.set_grad_enabled(grad):
                        z = fastvae.reparameterize(mu, lv, eps=eps, generator=gen, backend="triton")
                    roles[z.data_ptr()] = "z"
                    if grad:
                        g = _aligned(torch.ones_like(z))
                        roles[g.data_ptr()] = "grad_out"
                        z.backward(g)
                    current["keep"] = current.get("keep", []) + [mu, lv, eps, z]
        # ---- reparameterize with K samples per input (IWAE), forward and backward
        for dname, dt in dtypes.items():
            mu = _aligned(torch.empty(B, L, dtype=dt)).requires_grad_()
            lv = _aligned(torch.empty(B, L, dtype=dt)).requires_grad_()
            roles = {mu.data_ptr(): "mu", lv.data_ptr(): "logvar"}
            for name, t in (("d_mu", mu), ("d_logvar", lv)):
                t.register_hook(_role_hook(roles, name))
            current.update(call=f"reparam {dname} drawn K=5 grad", roles=roles)
            z = fastvae.reparameterize(mu, lv, num_samples=5, generator=gen, backend="triton")
            roles[z.data_ptr()] = "z"
            g = _aligned(torch.ones_like(z))
            roles[g.data_ptr()] = "grad_out"
            z.backward(g)
            current["keep"] = current.get("keep", []) + [mu, lv, z]
        # ---- fused decoder output layer + likelihood (IWAE): h [M, H] x W [D, H], 5000 samples of 4 images
        M, H = 20000, 400
        for dname, dt in dtypes.items():
            for likelihood in ("bernoulli", "gaussian"):
                h = _aligned(torch.empty(M, H, dtype=dt))
                w = _aligned(torch.empty(N, H, dtype=dt))
                bias = _aligned(torch.empty(N, dtype=dt))
                x = _aligned(torch.empty(4, N, dtype=dt))
                roles = {h.data_ptr(): "h", w.data_ptr(): "W", bias.data_ptr(): "bias", x.data_ptr(): "x"}
                current.update(call=f"decoder_log_px {dname} {likelihood}", roles=roles)
                out = torch.ops.fastvae.decoder_log_px(h, w, bias, x, 5000, likelihood, 1.0)
                roles[out.data_ptr()] = "log_px"
                current.update(call=f"decoder_dlogits {dname} {likelihood}", roles=roles)
                g = _aligned(torch.empty(4096, dtype=torch.float32))
                roles[g.data_ptr()] = "grad_out"
                d = torch.ops.fastvae.decoder_dlogits(h[:4096], w, bias, x, g, 1024, likelihood, 1.0)
                current["keep"] = current.get("keep", []) + [h, w, bias, x, out, g, d]
    finally:
        _triton_ops.wrap_triton, _triton_ops._direct, _backend.interpreter_enabled = saved
    # the recorded launches keep their arguments alive, so no address was reused within a call
    return launches, current.get("keep")


# --------------------------------------------------------------------------------------------
# analysis of one compiled kernel
# --------------------------------------------------------------------------------------------

_PTX_PARAM = re.compile(r"\.param\s+\.(\w+)(\s+\.ptr)?[^\n,]*?\s(\w+_param_(\d+))")
_PTX_MEM = re.compile(r"\b(ld|st)\.global((?:\.\w+)*)\s")
_REG = re.compile(r"%[a-z]+\d+")
_TYPE_BITS = {"b8": 8, "u8": 8, "s8": 8, "b16": 16, "u16": 16, "s16": 16, "f16": 16, "bf16": 16,
              "b32": 32, "u32": 32, "s32": 32, "f32": 32, "b64": 64, "u64": 64, "s64": 64, "f64": 64,
              "b128": 128}


def ptx_global_accesses(ptx: str, pointer_names: list[str]):
    """{(name, "ld"|"st"): Counter(bits per access -> count)} for the PTX's global loads and
    stores, each attributed to the pointer parameter(s) its address register derives from."""
    lines = [ln.split("//")[0].strip() for ln in ptx.splitlines()]
    # pointer parameters in order; the pointers after the kernel's own tensors are Triton's scratch
    params = [(int(m.group(4)), m.group(3), bool(m.group(2))) for m in _PTX_PARAM.finditer(ptx)]
    ptr_params = [name for _, name, is_ptr in sorted(params) if is_ptr]
    pname = {p: (pointer_names[i] if i < len(pointer_names) else f"scratch{i - len(pointer_names)}")
             for i, p in enumerate(ptr_params)}
    # module-level constants (e.g. libdevice's tables for sin/cos range reduction)
    globals_ = set(re.findall(r"^\.global\s[^\n]*?\s([\w$]+)\[", ptx, flags=re.M))
    taint: dict[str, frozenset] = defaultdict(frozenset)
    instrs = []
    for ln in lines:
        if not ln or ln.startswith((".", "{", "}", "$")) or ln.endswith(":"):
            continue
        ln = re.sub(r"^@!?%\w+\s+", "", ln).rstrip(";").strip()
        instrs.append(ln)
    # propagate "derives from pointer parameter p" to a fixpoint (loops re-assign registers)
    changed = True
    while changed:
        changed = False
        for ln in instrs:
            op = ln.split(None, 1)[0]
            if op.startswith("ld.param"):
                m = re.search(r"\[(\w+_param_\d+)\]", ln)
                dst = _REG.findall(ln)[:1]
                if m and dst and m.group(1) in pname:
                    new = frozenset([pname[m.group(1)]])
                    if not new <= taint[dst[0]]:
                        taint[dst[0]] |= new
                        changed = True
                continue
            if op.startswith(("ld.", "st.", "bra", "ret", "bar", "atom", "red.", "@")):
                continue  # a load's result is data, not an address derived from its pointer
            regs = _REG.findall(ln)
            consts = frozenset(f"const:{w}" for w in re.findall(r"[\w$]+", ln) if w in globals_)
            if not regs or (len(regs) < 2 and not consts):
                continue
            src = frozenset().union(*(taint[r] for r in regs[1:])) | consts
            if src and not src <= taint[regs[0]]:
                taint[regs[0]] |= src
                changed = True
    acc: dict = defaultdict(Counter)
    for ln in instrs:
        m = _PTX_MEM.match(ln)
        if not m:
            continue
        kind, mods = m.group(1), m.group(2).split(".")[1:]
        vec = 1
        bits = 32
        for mod in mods:
            if mod in ("v2", "v4", "v8"):
                vec = int(mod[1:])
            elif mod in _TYPE_BITS:
                bits = _TYPE_BITS[mod]
        addr = re.search(r"\[\s*(%\w+)", ln)
        owners = taint[addr.group(1)] if addr else frozenset()
        owner = "+".join(sorted(owners)) if owners else "?"
        acc[(owner, kind)][vec * bits] += 1
    return acc


def ptxas_usage(ptxas: str, ptx: str, arch: str):
    """(registers, spill store bytes, spill load bytes, stack bytes) from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        base = [ptxas, "-lineinfo", "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(d) / "k.o")]
        out = subprocess.run(base[:3] + ["--regAllocOptLevel=2"] + base[3:], capture_output=True, text=True)
        if out.returncode != 0:  # a ptxas without that flag
            out = subprocess.run(base, capture_output=True, text=True, check=True)
    log = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return (int(regs.group(1)) if regs else None,
            int(spill.group(1)) if spill else None, int(spill.group(2)) if spill else None,
            int(stack.group(1)) if stack else None)


def cubin_sass(cuobjdump: str, cubin: bytes):
    """(resource usage dict, SASS instruction list [(address, text)]) of a cubin."""
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "k.cubin"
        f.write_bytes(cubin)
        res = subprocess.run([cuobjdump, "-res-usage", str(f)], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", str(f)], capture_output=True, text=True, check=True).stdout
    usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res)}
    instrs = []
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass):
        instrs.append((int(m.group(1), 16), " ".join(m.group(2).split())))
    return usage, instrs


def sass_stats(instrs):
    """Counts of global loads/stores by width, and the main loop (see the module docstring)."""
    def mem(text):
        m = re.search(r"\b(LDG|STG)\.E(\.\w+)*", text)
        if not m:
            return None
        width = 32
        for part in m.group(0).split(".")[2:]:
            if part in ("64", "128"):
                width = int(part)
            elif part in ("U8", "S8"):
                width = 8
            elif part in ("U16", "S16"):
                width = 16
        return m.group(1), width

    counts = Counter()
    for _, text in instrs:
        mm = mem(text)
        if mm:
            counts[f"{mm[0]}.{mm[1]}"] += 1
    body = [(a, t) for a, t in instrs if not t.startswith("NOP")]
    loops = []
    for addr, text in body:
        m = re.search(r"\bBRA\s+(?:`?\(?\.?\w*\)?\s*)?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) <= addr:
            lo = int(m.group(1), 16)
            inside = [(a, t) for a, t in body if lo <= a <= addr]
            nmem = sum(1 for _, t in inside if mem(t))
            loops.append((nmem, -len(inside), lo, addr, len(inside)))
    loops = [lp for lp in loops if lp[0] > 0]
    if loops:
        nmem, _, lo, hi, n = max(loops)
        main = dict(loop=True, start=hex(lo), end=hex(hi), instructions=n, global_mem_ops=nmem)
    else:
        end = next((a for a, t in body if t.startswith("EXIT") and a == body[-1][0]), None)
        main = dict(loop=False, instructions=sum(1 for a, t in body if not t.startswith(("BRA", "EXIT"))
                                                 or a != end),
                    global_mem_ops=sum(counts.values()))
    return counts, main


def occupancy(regs: int, num_warps: int, smem: int):
    per_warp = -(-regs * 32 // SM90["reg_alloc_unit"]) * SM90["reg_alloc_unit"]
    by_regs = (SM90["regs"] // per_warp) // num_warps
    by_warps = SM90["warps"] // num_warps
    by_smem = SM90["smem"] // (smem + SM90["smem_reserved_per_block"])
    limits = {"registers": by_regs, "warps": by_warps, "blocks": SM90["blocks"], "shared memory": by_smem}
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: (limits[k], k != "registers"))
    return blocks, blocks * num_warps / SM90["warps"], limiter


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------

def _dtype_name(t):
    return str(t.dtype).replace("torch.", "")


ANALYSIS_VERSION = 1  # bump when the analysis of a compiled kernel changes (invalidates the tool cache)


def _tool_cache_dir():
    """Where ptxas/cuobjdump results are kept between runs, keyed by Triton's kernel hash
    ($FASTVAE_SM90_CACHE, else next to Triton's own cache); None where it cannot be written."""
    d = os.environ.get("FASTVAE_SM90_CACHE")
    if not d:
        base = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
        d = os.path.join(os.path.dirname(base.rstrip("/")) or ".", "fastvae-sm90")
    try:
        os.makedirs(d, exist_ok=True)
    except OSError:
        return None
    return Path(d)


def analyse(launches, ptxas, cuobjdump, arch="sm_90a"):
    """One dict per distinct compiled kernel (see the module docstring)."""
    import torch
    from concurrent.futures import ThreadPoolExecutor

    variants: dict[str, dict] = {}
    compiled = {}
    errors = []
    for la in launches:
        k = la.kernel
        t0 = time.perf_counter()
        try:
            ck = k.run(*la.args, grid=la.grid, warmup=True, **la.kwargs)
        except Exception as e:  # noqa: BLE001 - reported, and asserted on by tests/test_sm90.py
            errors.append(dict(kernel=getattr(getattr(k, "fn", None), "__name__", repr(k)), call=la.call,
                               error=f"{type(e).__name__}: {str(e)[:2000]}"))
            continue
        compile_s = time.perf_counter() - t0
        h = ck.metadata.hash
        names = k.arg_names
        # every argument by name, in the kernel's parameter order (the launches pass keywords)
        bound = {**dict(zip(names, la.args)), **{n: a for n, a in la.kwargs.items() if n in names}}
        bound = {n: bound[n] for n in names if n in bound}
        tensors = [(n, a) for n, a in bound.items() if isinstance(a, torch.Tensor)]
        roles = {n: la.labels.get(a.data_ptr(), "buffer") for n, a in tensors}
        if h in variants:
            v = variants[h]
            v["calls"].append(la.call)
            for n, r in roles.items():
                if r not in v["args"][n]["roles"]:
                    v["args"][n]["roles"].append(r)
            continue
        grid = la.grid if isinstance(la.grid, tuple) else tuple(la.grid)
        constexprs = {p.name: la.kwargs[p.name] for p in k.params if p.is_constexpr and p.name in la.kwargs}
        # integer arguments Triton specialised: == 1 (a constant) or divisible by 16
        ints = {n: ("=1" if a == 1 else "%16" if a % 16 == 0 else "")
                for n, a in bound.items() if isinstance(a, int) and not isinstance(a, bool)
                and n not in constexprs}
        variants[h] = dict(
            kernel=k.fn.__name__, module=k.fn.__module__, hash=h, calls=[la.call],
            constexprs=constexprs, int_specialisation=ints,
            num_warps=ck.metadata.num_warps, num_stages=ck.metadata.num_stages,
            shared_bytes=ck.metadata.shared, grid=[int(g) for g in grid],
            args={n: dict(roles=[roles[n]], dtype=_dtype_name(a), element_bits=a.element_size() * 8)
                  for n, a in tensors},
            compile_s=round(compile_s, 3),
        )
        compiled[h] = (ck.asm["ptx"], ck.asm["cubin"], [n for n, _ in tensors])

    cache = _tool_cache_dir()
    tool_key = f"{ptxas}:{os.path.getmtime(ptxas)}:{cuobjdump}:{arch}:{ANALYSIS_VERSION}"

    def tools(h):
        ptx, cubin, tensor_names = compiled[h]
        f = cache / f"{h}-{hashlib.sha256(repr((tool_key, tensor_names)).encode()).hexdigest()[:16]}.json" if cache else None
        if f is not None and f.exists():  # ptxas/cuobjdump output of this exact kernel, kept from an earlier run
            try:
                got = json.loads(f.read_text())
                acc = {(o, kind): Counter({int(w): c for w, c in cnt.items()}) for o, kind, cnt in got["acc"]}
                return acc, tuple(got["ptxas"]), got["usage"], [tuple(i) for i in got["sass"]]
            except (ValueError, KeyError, TypeError):
                pass
        usage, sass = cubin_sass(cuobjdump, cubin) if cuobjdump else ({}, [])
        acc, ptxas_v = ptx_global_accesses(ptx, tensor_names), ptxas_usage(ptxas, ptx, arch)
        if f is not None:
            try:
                f.write_text(json.dumps(dict(acc=[(o, kind, dict(c)) for (o, kind), c in acc.items()],
                                             ptxas=ptxas_v, usage=usage, sass=sass)))
            except OSError:
                pass
        return acc, ptxas_v, usage, sass

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        results = dict(zip(compiled, pool.map(tools, compiled)))

    for h, v in variants.items():
        ptx = compiled[h][0]
        accesses, (regs, spill_st, spill_ld, stack), usage, sass = results[h]
        sass_counts, main = sass_stats(sass) if sass else (Counter(), None)
        blocks, occ, limiter = occupancy(regs, v["num_warps"], v["shared_bytes"])
        elems_per_thread = 0
        for n, a in v["args"].items():
            ld = accesses.get((n, "ld"), Counter())
            st = accesses.get((n, "st"), Counter())
            elems = max(sum(w * c for w, c in ld.items()), sum(w * c for w, c in st.items())) // a["element_bits"]
            elems_per_thread = max(elems_per_thread, elems)
            a.update(load_bits={str(w): c for w, c in sorted(ld.items())},
                     store_bits={str(w): c for w, c in sorted(st.items())},
                     elements_per_thread=elems)
        v.update(
            other_accesses={f"{o}:{kind}": {str(w): c for w, c in sorted(cnt.items())}
                            for (o, kind), cnt in accesses.items() if o not in v["args"]},
            registers=regs, cubin_registers=usage.get("REG"), spill_store_bytes=spill_st,
            spill_load_bytes=spill_ld, stack_bytes=stack, local_bytes=usage.get("LOCAL"),
            blocks_per_sm=blocks, occupancy=occ, occupancy_limiter=limiter,
            ptx_ld_v4=len(re.findall(r"\bld\.global(?:\.\w+)*\.v4\.b32", ptx)),
            ptx_st_v4=len(re.findall(r"\bst\.global(?:\.\w+)*\.v4\.b32", ptx)),
            sass_global=dict(sorted(sass_counts.items())) if sass else None,
            sass_ldg128=sass_counts.get("LDG.128", 0) if sass else None,
            sass_stg128=sass_counts.get("STG.128", 0) if sass else None,
            main_loop=main,
            elements_per_thread_per_iteration=elems_per_thread,
            sass_per_element=(round(main["instructions"] / elems_per_thread, 2)
                              if main and elems_per_thread else None),
        )
    return list(variants.values()), errors


def _variant_label(v):
    skip = {"BLOCK_M", "BLOCK_N", "BLOCK_L", "BLOCK"}
    flags = [f"{k}" if val is True else f"{k}={val}" for k, val in v["constexprs"].items()
             if k not in skip and val is not False]
    blocks = "×".join(str(val) for k, val in v["constexprs"].items() if k.startswith("BLOCK"))
    dts = {}
    for n, a in v["args"].items():
        r = a["roles"][0]
        if r in ("recon", "x", "mu", "eps", "grad_out") and r not in dts:
            dts[r] = f"{r} {a['dtype']}"
    dts = list(dts.values())
    return " ".join(flags) or "—", blocks, ", ".join(dts)


def _widths(v, role_prefixes):
    """'recon ld 128' style summary of the narrowest access of each main stream."""
    out = []
    for n, a in v["args"].items():
        role = a["roles"][0]
        if role not in role_prefixes:
            continue
        for kind, key in (("ld", "load_bits"), ("st", "store_bits")):
            if a[key]:
                out.append(f"{role} {kind} {min(int(w) for w in a[key])}")
    return ", ".join(out)


def markdown(report):
    rows = []
    for v in report["variants"]:
        flags, blocks, dts = _variant_label(v)
        occ = f"{v['occupancy'] * 100:.1f}% ({v['occupancy_limiter']})"
        spills = f"{v['spill_store_bytes']}/{v['spill_load_bytes']}"
        s128 = ("—" if v["sass_ldg128"] is None else f"{v['sass_ldg128']} / {v['sass_stg128']}")
        per_el = "—" if v["sass_per_element"] is None else (
            f"{v['sass_per_element']:.1f} ({v['main_loop']['instructions']}/"
            f"{v['elements_per_thread_per_iteration']}{'' if v['main_loop']['loop'] else ', no loop'})")
        streams = _widths(v, ("recon", "x", "d_recon", "d_x", "mu", "logvar", "eps", "z", "grad_out",
                              "d_mu", "d_logvar", "d_eps"))
        calls = v["calls"][0] + (f" (+{len(v['calls']) - 1})" if len(v["calls"]) > 1 else "")
        rows.append(f"| `{v['kernel']}` | {flags} | {dts} | {blocks} | {v['num_warps']} | {v['registers']} | "
                    f"{spills} | {v['shared_bytes']} | {occ} | {s128} | {streams} | {per_el} | {calls} |")
    meta = report["meta"]
    head = (f"triton {meta['triton']}, torch {meta['torch']}, target {meta['target']}, ptxas "
            f"{meta['ptxas_version']}; B={meta['B']}, N={meta['N']}, L={meta['L']}, contiguous 16-byte aligned "
            f"inputs; {len(report['variants'])} distinct compiled kernels from {meta['launches']} captured launches "
            f"({meta['calls']} public-API calls); generated {meta['date']} at commit {meta['commit']}.")
    lines = [
        START,
        "<!-- generated by benchmarks/sm90_report.py; do not edit by hand -->",
        "",
        head,
        "",
        "Columns: flags and dtypes of the variant; block sizes; warps; registers/thread; spill bytes "
        "stored/loaded; shared memory (bytes); theoretical occupancy on sm_90 and what limits it; "
        "128-bit global loads/stores in the SASS (LDG.E.128 / STG.E.128); the narrowest vector width "
        "(bits) of each stream's global loads (ld) and stores (st) in the PTX; SASS instructions per "
        "element of the main loop (instructions in the SASS loop holding the most global memory "
        "operations / elements one thread accesses per iteration in one tensor); the first public-API "
        "call that launches this kernel (and how many more do).",
        "",
        "| kernel | flags | dtypes | blocks | warps | regs | spills st/ld | smem | occupancy | LDG/STG.128 "
        "| vector width (bits) per stream | SASS/elem | launched by |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *[f"**Failed to compile** `{e['kernel']}` ({e['call']}): {e['error'].splitlines()[0]}" for e in report["errors"]],
        END,
    ]
    return "\n".join(lines)


def write_readme(md: str, readme: Path = README):
    text = readme.read_text()
    cmd = ("Regenerate with `python -m benchmarks.sm90_report --markdown` (writes "
           "[`results/sm90-static.json`](results/sm90-static.json) too); `tests/test_sm90.py` asserts "
           "on the same report (`pytest -k sm90`).")
    if START in text and END in text:
        before, rest = text.split(START, 1)
        _, after = rest.split(END, 1)
        text = before + md + after
    else:
        text = text.rstrip("\n") + "\n\n" + SECTION + "\n\n" + (
            "Every kernel variant the launchers produce, compiled ahead of time for sm_90 (H100) on a "
            "machine without a GPU: Triton's own JIT path with a fake sm_90 driver, then `ptxas` and "
            "`cuobjdump` from the triton wheel. See the docstring of `benchmarks/sm90_report.py` for "
            "how each column is measured. ") + cmd + "\n\n" + md + "\n"
    readme.write_text(text)


def build_report(verbose=False):
    t0 = time.perf_counter()
    try:
        ptxas, cuobjdump = nvidia_tools()
    except RuntimeError as e:
        return {"skipped": str(e)}
    import torch
    import triton

    activate_fake_driver(90)
    launches, _keep = capture_launches()
    calls = len({la.call for la in launches})
    variants, errors = analyse(launches, ptxas, cuobjdump)
    ver = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", ver)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True,
                                cwd=HERE).stdout.strip() or None
    except OSError:
        commit = None
    import datetime as _dt

    meta = dict(triton=triton.__version__, torch=torch.__version__, target="cuda sm_90 (GPUTarget('cuda', 90, 32))",
                ptxas=ptxas, ptxas_version=m.group(1) if m else ver.strip(), cuobjdump=cuobjdump,
                B=B, N=N, L=L, launches=len(launches), calls=calls,
                date=_dt.date.today().isoformat(), commit=commit,
                seconds=round(time.perf_counter() - t0, 1), sm90_limits=SM90)
    return {"meta": meta, "errors": errors, "variants": variants}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"write the JSON here (default {DEFAULT_JSON})")
    ap.add_argument("--markdown", action="store_true",
                    help="rewrite the table between the sm90-report markers in benchmarks/README.md")
    ns = ap.parse_args(argv)
    report = build_report()
    ns.json.parent.mkdir(parents=True, exist_ok=True)
    ns.json.write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")
    if "skipped" in report:
        print(f"sm90 report skipped: {report['skipped']}")
        return 0
    md = markdown(report)
    print(md)
    for e in report["errors"]:
        print(f"FAILED to compile {e['kernel']} for {e['call']}: {e['error']}", file=sys.stderr)
    if ns.markdown:
        write_readme(md)
    print(f"{len(report['variants'])} variants in {report['meta']['seconds']} s; JSON: {ns.json}", file=sys.stderr)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
