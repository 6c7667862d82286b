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
    runtime = knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    return bool(getattr(enter, "calls", enter) or getattr(leave, "calls", leave))


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


class Static:
    """The launch arguments that a call site derives from its shapes and options alone (sizes,
    ``tl.constexpr`` flags, launch options). A site makes them with an ``lru_cache``d function of
    those shapes and options, so that each distinct value is one object (a Launcher binds it by
    identity), and passes the tensors and the runtime floats of each call beside it (:func:`launch`)."""

    __slots__ = ("kwargs",)

    def __init__(self, **kwargs):
        self.kwargs = kwargs


class Launcher:
    """A Triton kernel's launcher that binds its arguments once per specialization."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.interpreted = not hasattr(kernel, "device_caches")  # an InterpretedFunction
        self.bind = None
        self.compiled: dict = {}
        self.direct: dict = {}  # id(static) -> (static, its direct launcher)

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
        self.names = names
        driver = triton.runtime.driver.active
        self.device, self.stream = driver.get_current_device, driver.get_current_stream

    def launch(self, grid, kwargs):
        """``kernel[grid](**kwargs)``; returns (run, function, metadata, positional arguments) where
        the direct call applies, else None."""
        if self.interpreted or _hooks_installed():
            self.kernel[grid](**kwargs)
            return None
        if self.bind is None:
            self._learn(kwargs)
        try:
            key, aligned, args = self.bind(**kwargs)
        except (AttributeError, TypeError):   # arguments of another kind or name: Triton's path
            self.kernel[grid](**kwargs)
            return None
        device = self.device()
        hit = self.compiled.get((device, key)) if aligned else None
        if hit is None:
            compiled = self.kernel[grid](**kwargs)        # compiles if needed, and launches
            if not aligned:
                return None
            hit = self.compiled[device, key] = (compiled.run, compiled.function, compiled.packed_metadata)
            return hit + (args,)
        run, function, metadata = hit
        n = len(grid)
        run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, self.stream(device), function,
            metadata, None, None, None, *args)
        return hit + (args,)

    def launch_static(self, grid, static: Static, dynamic: dict, made: tuple = ()) -> None:
        """``kernel[grid](**static.kwargs, **dynamic)`` for ``dynamic`` the tensors and floats of
        one call. The first call of a ``static`` binds the rest: a launcher written out for it
        (:func:`_direct_call`), which checks the tensors' dtypes, their alignment and the current
        device against the bound ones and otherwise calls the compiled launcher directly. ``made``
        names the tensors the caller allocated itself, new and contiguous with dtypes that follow
        from the others': they are not checked again."""
        hit = self.direct.get(id(static))
        if hit is not None and hit[0] is static and not _hooks_installed() and hit[1](grid, **dynamic):
            return
        kwargs = {**static.kwargs, **dynamic}
        bound = self.launch(grid, kwargs)
        if bound is not None:
            run, function, metadata, args = bound
            self.direct[id(static)] = (static, _direct_call(
                self.names, args, dynamic, made, run, function, metadata, self.device(), self.device,
                self.stream))


def _direct_call(names, args, dynamic: dict, made, run, function, metadata, device, current_device, stream):
    """A function of (grid, **dynamic) that launches ``function`` with the bound ``args`` of every
    other parameter, when the tensors of ``dynamic`` (but those in ``made``) have the dtypes of this
    call's, are 16-byte aligned, and ``device`` is current; it returns False (launching nothing)
    otherwise."""
    tensors = [n for n, v in dynamic.items() if v.__class__ is not float and n not in made]
    scope = {"run": run, "function": function, "metadata": metadata, "DEVICE": device,
             "current_device": current_device, "stream": stream}
    params = []
    for i, name in enumerate(names):
        if name in dynamic:
            params.append(name)
        else:
            scope[f"A{i}"] = args[i]
            params.append(f"A{i}")
    checks = []
    for n in tensors:
        scope[f"D_{n}"] = dynamic[n].dtype
        checks.append(f"{n}.dtype is not D_{n}")
    aligned = " | ".join(f"{n}.data_ptr()" for n in tensors) or "0"
    src = (f"def call(grid, *, {', '.join(dynamic)}):\n"
           f"    if {' or '.join(checks) or 'False'} or ({aligned}) % 16 or current_device() != DEVICE:\n"
           f"        return False\n"
           f"    n = len(grid)\n"
           f"    run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream(DEVICE), function, "
           f"metadata, None, None, None, {', '.join(params)})\n"
           f"    return True\n")
    exec(src, scope)  # noqa: S102 (generated from the kernel's parameter names only)
    return scope["call"]


def launch(kernel_launch, kernel, grid, static: Static, made: tuple = (), **dynamic) -> None:
    """``kernel_launch(kernel)[grid](**static.kwargs, **dynamic)``: through a :class:`Launcher`'s
    bound arguments where ``kernel_launch`` gives one (``made``: see :meth:`Launcher.launch_static`),
    else as given (``wrap_triton`` records the launch for a tracer)."""
    runner = kernel_launch(kernel)
    if isinstance(runner, Launcher):
        runner.launch_static(grid, static, dynamic, made)
    else:
        runner[grid](**static.kwargs, **dynamic)


# ---- device-side state of the launches ----------------------------------------------------------

_SCRATCH: dict = {}
_SMS: dict = {}


def fresh_scratch(device, floats: int):
    """(a float32 buffer of ``floats`` elements, a zeroed int32 counter), new on every call."""
    import torch

    return (torch.empty(floats, device=device, dtype=torch.float32),
            torch.zeros(1, device=device, dtype=torch.int32))


def stream_scratch(device, floats: int):
    """The same as :func:`fresh_scratch`, kept per device and stream: the partial sums of a
    last-program reduction and its ticket counter, which the last program sets back to 0. Launches
    on one stream run in order, so they never share them in flight. While a CUDA graph is being
    captured each call gets new ones (the counter zeroed by the graph itself), so that replays of
    different graphs, on any streams, never share them either."""
    if device.type == "cuda":
        import torch

        if torch.cuda.is_current_stream_capturing():
            return fresh_scratch(device, floats)
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (index, triton.runtime.driver.active.get_current_stream(index))
    else:
        key = -1
    hit = _SCRATCH.get(key)
    if hit is None or hit[0].numel() < floats:
        hit = _SCRATCH[key] = fresh_scratch(device, max(floats, 4096))
    return hit


def persistent_programs(device, per_sm: int = 4) -> int:
    """The grid of a persistent kernel on ``device``: ``per_sm`` programs per streaming
    multiprocessor (a fixed 4 x 132 off CUDA: Triton's interpreter, or a driver without a GPU)."""
    if device.type != "cuda":
        return per_sm * 132
    n = _SMS.get((device.index, per_sm))
    if n is None:
        import torch

        n = _SMS[device.index, per_sm] = per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return n
