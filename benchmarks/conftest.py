"""Conventions of fastvae's benchmark suite: read this before adding a benchmark file.

Run it with ``pytest benchmarks/ --benchmark-only`` (add ``--fastvae-save`` to write the results;
see benchmarks/README.md). CI runs it as a smoke test with ``--benchmark-disable``: each benchmark
body then runs once, untimed. Never assert on timings; cheap correctness checks are welcome.

Every benchmark goes through the ``bench`` fixture, called once per test::

    def test_something(bench, device):
        x = torch.randn(4096, 784, device=device)
        bench(lambda: work(x), group="something-B4096", provider="fastvae")

``bench(fn, *, group, provider, setup=None, bytes_moved=None, rounds=None, warmup=1, **extra)``

* ``group``: the comparison group, named ``<op>-<mode>-B<batch>[-<dtype>]`` (``"elbo-full-B65536"``,
  ``"reparam-fwd-B128-bf16"``, ``"train-epoch-B128"``); the report computes speed-ups against the
  ``"eager"`` provider of the same group and plots them against the ``B<batch>`` part.
* ``provider``: ``"eager"``, ``"compile"``, ``"fastvae"`` or ``"copy"`` (the bandwidth reference).
  It goes to ``benchmark.extra_info["provider"]``; ``extra_info["device"]`` gets the CPU or GPU name.
* ``setup``: optional, runs before every call outside the timed region and returns the tuple of
  positional arguments for ``fn`` (how the backward-only groups build the graph each round).
* ``bytes_moved``: the minimal bytes the op must move; recorded with the achieved GB/s.
* ``rounds``: fixed number of timed calls; by default ``--benchmark-max-time`` (1 s) divided by
  the time of one call, at least ``--benchmark-min-rounds`` (5) and at most 1000. ``warmup``
  untimed calls come first (their first one, where ``torch.compile`` compiles, is recorded as
  ``extra_info["first_call_s"]``). Pass e.g. ``rounds=3`` for something that takes seconds.
* ``**extra``: more ``extra_info`` entries (batch, dtype, ...).

On CUDA the timed function synchronises before it returns (and ``setup`` after its forward),
and the peak memory of one extra call goes to ``extra_info["peak_mem_mib"]`` (absolute, from
``torch.cuda.max_memory_allocated`` after a reset) and ``["peak_extra_mib"]`` (above what was
allocated before the call). Other fixtures: ``device`` (a ``torch.device``: CUDA when available,
else CPU; ``--fastvae-device`` overrides), ``device_name`` (the string put in ``extra_info``), and
``dtype``: a test taking it runs for float32, and on CUDA for bfloat16 too.

The benchmarks never set TRITON_INTERPRET: on CPU the ``fastvae`` provider is the PyTorch
fallback, the product's CPU path (``torch.compile`` cannot trace the Triton interpreter anyway).
"""
from __future__ import annotations

import importlib.util
import math
import os
import time
from pathlib import Path

import pytest
import torch

from fastvae._backend import hardware_name

HERE = Path(__file__).resolve().parent
MAX_ROUNDS = 1000


def pytest_addoption(parser):
    group = parser.getgroup("fastvae benchmarks")
    group.addoption("--fastvae-device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="device the benchmarks run on (default: cuda when available, else cpu)")
    group.addoption("--fastvae-save", action="store_true",
                    help="after the run, write benchmarks/results/<device>.json, the table in "
                         "benchmarks/README.md and the speed-up plot (see benchmarks/report.py)")


def _resolve_device(config) -> torch.device:
    choice = config.getoption("fastvae_device")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--fastvae-device=cuda but no CUDA device is available")
    return torch.device(choice)


def name_of(device: torch.device) -> str:
    return hardware_name(device)


def suite_device(config) -> torch.device:
    """The device the suite runs on, resolved once per session."""
    if getattr(config, "_fastvae_device", None) is None:
        config._fastvae_device = _resolve_device(config)
    return config._fastvae_device


def pytest_generate_tests(metafunc):
    if "dtype" in metafunc.fixturenames:
        dtypes = [torch.float32]
        if suite_device(metafunc.config).type == "cuda":
            dtypes.append(torch.bfloat16)
        metafunc.parametrize("dtype", dtypes, ids=[str(d).replace("torch.", "") for d in dtypes])


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    return suite_device(request.config)


@pytest.fixture(scope="session")
def device_name(device) -> str:
    return name_of(device)


class Bench:
    """Times one function through pytest-benchmark with fastvae's conventions (see above)."""

    def __init__(self, benchmark, device: torch.device, device_name: str, config):
        self.benchmark = benchmark
        self.device = device
        self.device_name = device_name
        self.max_time = float(config.getoption("benchmark_max_time"))
        self.min_rounds = int(config.getoption("benchmark_min_rounds"))
        self._used = False

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn, *, group: str, provider: str, setup=None, bytes_moved=None,
                 rounds=None, warmup: int = 1, **extra):
        if self._used:
            raise RuntimeError("call bench(...) once per test")
        self._used = True
        b = self.benchmark
        b.group = group
        info = b.extra_info
        info.update(provider=provider, device=self.device_name, device_type=self.device.type)
        if self.device.type == "cpu":
            info["threads"] = torch.get_num_threads()
        info.update(extra)
        if bytes_moved is not None:
            info["bytes"] = int(bytes_moved)

        def timed(*args):
            out = fn(*args)
            self._sync()  # on CUDA the kernel time is in the timed region, not just the launch
            return out

        def make_args():
            if setup is None:
                return ()
            args = setup()
            self._sync()  # the setup's own kernels must not spill into the timed region
            return tuple(args) if args is not None else ()

        def pedantic_setup():
            return make_args(), {}

        if b.disabled:  # --benchmark-disable: run the body once, untimed
            return b.pedantic(timed, setup=pedantic_setup, rounds=1, iterations=1)

        for i in range(warmup):
            args = make_args()
            t0 = time.perf_counter()
            timed(*args)
            if i == 0:
                info["first_call_s"] = time.perf_counter() - t0
            del args
        if rounds is None:
            args = make_args()
            t0 = time.perf_counter()
            timed(*args)
            one = max(time.perf_counter() - t0, 1e-7)
            del args
            rounds = max(self.min_rounds, min(MAX_ROUNDS, math.ceil(self.max_time / one)))
        result = b.pedantic(timed, setup=pedantic_setup, rounds=int(rounds), iterations=1)

        if b.stats is not None and bytes_moved is not None:
            info["gbps"] = bytes_moved / b.stats.stats.median / 1e9
        if self.device.type == "cuda":
            args = make_args()
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            timed(*args)
            peak = torch.cuda.max_memory_allocated(self.device)
            info["peak_mem_mib"] = peak / 2**20
            info["peak_extra_mib"] = (peak - base) / 2**20
            del args
        return result


@pytest.fixture
def bench(benchmark, device, device_name, request) -> Bench:
    return Bench(benchmark, device, device_name, request.config)


def other_cpu_load(seconds: float = 0.5):
    """Cores' worth of CPU that other processes use, sampled from /proc/stat while this one
    sleeps (Linux; None elsewhere). Other load makes CPU timings meaningless."""
    def read():
        with open("/proc/stat", encoding="ascii") as fh:
            v = [int(x) for x in fh.readline().split()[1:9]]
        return sum(v) - v[3] - v[4], sum(v)  # busy (all but idle and iowait), total
    try:
        b1, t1 = read()
        time.sleep(seconds)
        b2, t2 = read()
    except (OSError, ValueError):
        return None
    return (b2 - b1) / max(t2 - t1, 1) * (os.cpu_count() or 1)


def pytest_sessionstart(session):
    config = session.config
    config._fastvae_other_load = None
    if suite_device(config).type == "cpu" and not config.getoption("benchmark_disable", default=False):
        config._fastvae_other_load = other_cpu_load()
        load = config._fastvae_other_load
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter and load is not None and load > 0.2:
            reporter.write_line(f"fastvae: WARNING: other processes use {load:.1f} CPU cores; "
                                "CPU timings will be noisy", yellow=True)


def pytest_report_header(config):
    device = suite_device(config)
    line = f"fastvae benchmarks on {device.type}: {name_of(device)}"
    if device.type == "cpu":
        line += f", {torch.get_num_threads()} torch threads"
    return line


def _load_report():
    spec = importlib.util.spec_from_file_location("fastvae_bench_report", HERE / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if not config.getoption("fastvae_save", default=False):
        return
    bs = getattr(config, "_benchmarksession", None)
    benchmarks = [bm for bm in (bs.benchmarks if bs else []) if bm]
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if not benchmarks:
        if reporter:
            reporter.write_line("--fastvae-save: no timed benchmarks (was --benchmark-disable set?); "
                                "nothing written", yellow=True)
        return
    machine_info = bs.get_machine_info()
    machine_info["other_cpu_load_at_start"] = getattr(config, "_fastvae_other_load", None)
    commit_info = config.hook.pytest_benchmark_generate_commit_info(config=config)
    output = config.hook.pytest_benchmark_generate_json(
        config=config, benchmarks=benchmarks, include_data=False,
        machine_info=machine_info, commit_info=commit_info)
    written = _load_report().save_and_render(output)
    if reporter:
        for path in written:
            reporter.write_line(f"fastvae: wrote {path}", green=True)
