"""Launch a Triton kernel with Triton's binder run once per specialization, not once per call.

``kernel[grid](**kwargs)`` goes through ``JITFunction.run`` on every call: the binder, the
specialization key, the cache lookup, the launch metadata and the hooks. For the small, frequent
launches of a VAE step that is most of the host time of a call. :class:`Launcher` keeps Triton's
own path for the first call of each specialization (it compiles and launches, and returns the
``CompiledKernel``) and afterwards calls that compiled kernel's launcher directly:

    Launcher(kernel)[grid](**kwargs)      # the same call as kernel[grid](**kwargs)

The key is what Triton's binder specializes on:

* every ``tl.constexpr`` argument and every launch option (``num_warps``, ...) by value;
* every tensor argument by dtype; the direct call needs every address to be a multiple of
  16 bytes (what Triton assumes of a tensor it specializes as aligned);
* every integer argument by whether it equals 1, is a multiple of 16, and fits in 32 bits;
* floats are always fp32 and bools u1: they are not part of the key;
* the current device (a compiled kernel is loaded per device).

Triton's own path still runs where a direct call could differ from it: under Triton's interpreter
(CPU tensors), while a launch hook is installed (profilers such as proton see every launch), for
a tensor whose address is not 16-byte aligned, and for arguments of other kinds or names than
the first call's (the binding function then raises and is not used).
"""
from __future__ import annotations

import triton
from triton import knobs


def _hooks_installed() -> bool:
    # triton >= 3.5: HookChain objects (empty unless a profiler adds one); older: None or a callable
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return any(getattr(h, "calls", h) for h in hooks)


def _binder(names, constexprs, tensors, ints, options):
    """A function of the kernel's keyword arguments that returns (key, aligned, positional
    arguments), written out for this kernel's argument kinds: one call, no loops."""
    ptr_or = " | ".join(f"{t}.data_ptr()" for t in tensors) or "0"
    key = ([f"{t}.dtype" for t in tensors]
           + [f"{i} == 1, {i} % 16 == 0, -2147483648 <= {i} <= 2147483647" for i in ints]
           + list(constexprs) + list(options))
    src = (f"def bind({', '.join(names)}, *, {', '.join(options) or '_unused=None'}):\n"
           f"    return ({', '.join(key)},), ({ptr_or}) % 16 == 0, ({', '.join(names)},)\n")
    scope: dict = {}
    exec(src, scope)  # noqa: S102 (generated from the kernel's parameter names only)
    return scope["bind"]


class Launcher:
    """A Triton kernel's launcher that binds its arguments once per specialization."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.interpreted = not hasattr(kernel, "device_caches")  # an InterpretedFunction
        self.bind = None
        self.compiled: dict = {}

    def __getitem__(self, grid):
        return lambda **kwargs: self.launch(grid, kwargs)

    def _learn(self, kwargs) -> None:
        """Write the binding function from a call's argument kinds (each launch site passes every
        argument as the same kind on every call)."""
        import torch

        params = self.kernel.params
        names = tuple(p.name for p in params)
        runtime = [p.name for p in params if not p.is_constexpr]
        self.bind = _binder(
            names, tuple(p.name for p in params if p.is_constexpr),
            tuple(n for n in runtime if isinstance(kwargs[n], torch.Tensor)),
            tuple(n for n in runtime if type(kwargs[n]) is int),
            tuple(sorted(k for k in kwargs if k not in names)))
        driver = triton.runtime.driver.active
        self.device, self.stream = driver.get_current_device, driver.get_current_stream

    def launch(self, grid, kwargs):
        if self.interpreted or _hooks_installed():
            return self.kernel[grid](**kwargs)
        if self.bind is None:
            self._learn(kwargs)
        try:
            key, aligned, args = self.bind(**kwargs)
        except (AttributeError, TypeError):   # arguments of another kind or name: Triton's path
            return self.kernel[grid](**kwargs)
        device = self.device()
        hit = self.compiled.get((device, key)) if aligned else None
        if hit is None:
            compiled = self.kernel[grid](**kwargs)        # compiles if needed, and launches
            if aligned:
                self.compiled[device, key] = (compiled.run, compiled.function, compiled.packed_metadata)
            return compiled
        run, function, metadata = hit
        n = len(grid)
        run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, self.stream(device), function,
            metadata, None, None, None, *args)
        return None


# ---- device-side state of the launches ----------------------------------------------------------

_COUNTERS: dict = {}
_SMS: dict = {}


def ticket_counter(device):
    """A zeroed int32 for the kernels' last-program reductions, which set it back to 0 when they
    finish: one per device and stream, so launches in stream order never share one in flight.
    While a CUDA graph is being captured each call gets a new one (zeroed by the graph itself), so
    that replays of different graphs, on any streams, never share one either."""
    import torch

    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(1, device=device, dtype=torch.int32)
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (index, triton.runtime.driver.active.get_current_stream(index))
    else:
        key = device
    counter = _COUNTERS.get(key)
    if counter is None:
        counter = _COUNTERS[key] = torch.zeros(1, device=device, dtype=torch.int32)
    return counter


def persistent_programs(device, per_sm: int = 4) -> int:
    """The grid of a persistent kernel on ``device``: ``per_sm`` programs per streaming
    multiprocessor (a fixed 4 x 132 off CUDA: Triton's interpreter, or a driver without a GPU)."""
    n = _SMS.get(device)
    if n is None:
        import torch

        sms = (torch.cuda.get_device_properties(device).multi_processor_count
               if device.type == "cuda" else 132)
        n = _SMS[device] = per_sm * sms
    return n
