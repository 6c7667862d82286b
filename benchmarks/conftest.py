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

On CPU, ``extra_info`` also records ``threads`` (torch's thread count) and ``cpu_capability``
(ATen's dispatch level, ``torch.backends.cpu.get_cpu_capability()``: AVX2 and AVX-512 kernels
differ a lot in speed), and the results file is named after both. ``--fastvae-threads 1,2`` and
``--fastvae-cpu-levels avx2,avx512`` rerun the whole suite in one subprocess per combination
(``ATEN_CPU_CAPABILITY`` must be set before torch is imported), skipping levels the CPU lacks.

On CUDA the L2 cache is flushed before every timed call (``extra_info["l2_flushed"]``), the
timed function synchronises before it returns (and ``setup`` after its forward),
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
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastvae._backend import hardware_name

from .levels import level_env

HERE = Path(__file__).resolve().parent
MAX_ROUNDS = 1000


def pytest_addoption(parser):
    group = parser.getgroup("fastvae benchmarks")
    group.addoption("--fastvae-device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="device the benchmarks run on (default: cuda when available, else cpu)")
    group.addoption("--fastvae-save", action="store_true",
                    help="after the run, write benchmarks/results/<device>[-<capability>-t<threads>].json, "
                         "the table in benchmarks/README.md and the speed-up plot (see benchmarks/report.py)")
    group.addoption("--fastvae-cpu-levels", default=None, metavar="LEVELS",
                    help="comma-separated ATen CPU dispatch levels (e.g. avx2,avx512): rerun the suite "
                         "once per level in a subprocess with ATEN_CPU_CAPABILITY set; levels this CPU "
                         "cannot run are skipped with a warning")
    group.addoption("--fastvae-threads", default=None, metavar="N[,M...]",
                    help="torch thread counts for the CPU runs (e.g. 1,2); several counts (or any "
                         "--fastvae-cpu-levels) rerun the suite in one subprocess per combination")


# set in the subprocesses that --fastvae-cpu-levels / --fastvae-threads start
# What the suite writes itself: with several (level, threads) runs, the first run's results would
# otherwise mark the next one as run on uncommitted code.
SUITE_OUTPUTS = ("benchmarks/results/", "benchmarks/README.md")
CHILD_ENV = "FASTVAE_BENCH_CHILD"
THREADS_ENV = "FASTVAE_BENCH_THREADS"
DRIVER_OPTIONS = ("--fastvae-cpu-levels", "--fastvae-threads")


if os.environ.get("ATEN_CPU_CAPABILITY") and not os.environ.get(CHILD_ENV):
    # a level forced by hand (its children get theirs from the driver below): torch.compile's cache
    # of this level's own (benchmarks/levels.py)
    os.environ.update(level_env(os.environ["ATEN_CPU_CAPABILITY"]))


def _split(value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def cpu_capability() -> str:
    """ATen's CPU dispatch level in this process (e.g. "AVX2", "AVX512")."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        return "unknown"


def level_runs(level: str) -> bool:
    """Whether ATen can run at ``level`` on this CPU: forcing a level the CPU lacks kills the
    process with SIGILL, so try it in a throwaway one."""
    env = level_env(level)
    code = "import torch; x = torch.rand(4096); (x.exp() + x.log1p() + x.sigmoid()).sum().item()"
    try:
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _child_args(args):
    """The command-line arguments without the driver options."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in DRIVER_OPTIONS:
            skip = True
            continue
        if any(a.startswith(o + "=") for o in DRIVER_OPTIONS):
            continue
        out.append(a)
    return out


def pytest_cmdline_main(config):
    """--fastvae-cpu-levels / several --fastvae-threads: run the suite once per (level, threads)
    in a subprocess, one after the other (each writes its own results file with --fastvae-save)."""
    if os.environ.get(CHILD_ENV):
        return None
    levels = _split(config.getoption("fastvae_cpu_levels"))
    threads = _split(config.getoption("fastvae_threads"))
    if not levels and len(threads) <= 1:
        return None
    args = _child_args(list(config.invocation_params.args))
    rc = 0
    for level in levels or [None]:
        if level is not None and not level_runs(level):
            print(f"fastvae: ATEN_CPU_CAPABILITY={level} does not run on this CPU "
                  "(its instructions are missing); skipped", flush=True)
            continue
        for n in threads or [None]:
            env = dict(os.environ, **{CHILD_ENV: "1"})
            if level is not None:
                env = level_env(level, env)  # with an Inductor cache of the level's own
            if n is not None:
                env[THREADS_ENV] = str(int(n))
            print(f"fastvae: running the suite with ATEN_CPU_CAPABILITY={level or '(default)'}, "
                  f"{n or 'default'} torch threads", flush=True)
            r = subprocess.run([sys.executable, "-m", "pytest", *args], env=env,
                               cwd=config.invocation_params.dir).returncode
            rc = rc or r
    return rc


def pytest_configure(config):
    threads = os.environ.get(THREADS_ENV) or (_split(config.getoption("fastvae_threads", None)) or [None])[0]
    if threads:
        torch.set_num_threads(int(threads))


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

    def _flush_l2(self):
        """On CUDA, evict the L2 cache before every timed call (by writing a buffer of twice its
        size), so that small batches are not timed from cache."""
        if self.device.type != "cuda":
            return
        if getattr(self, "_l2_buffer", None) is None:
            l2 = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 0) or 64 << 20
            self._l2_buffer = torch.empty(2 * l2, dtype=torch.uint8, device=self.device)
        self._l2_buffer.zero_()

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
            info["cpu_capability"] = cpu_capability()
        else:
            info["l2_flushed"] = True
        info.update(extra)
        if bytes_moved is not None:
            info["bytes"] = int(bytes_moved)

        def timed(*args):
            out = fn(*args)
            self._sync()  # on CUDA the kernel time is in the timed region, not just the launch
            return out

        def make_args():
            args = setup() if setup is not None else None
            self._flush_l2()
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
        line += f", ATen CPU capability {cpu_capability()}, {torch.get_num_threads()} torch threads"
    return line


def _load_report():
    spec = importlib.util.spec_from_file_location("fastvae_bench_report", HERE / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_benchmark_update_machine_info(config, machine_info):
    """torch, triton and CUDA versions of the process that ran the benchmarks."""
    machine_info.update(_load_report()._torch_info())


def pytest_benchmark_update_commit_info(config, commit_info):
    """``dirty``: a tracked file other than the suite's own outputs differs from the commit.
    ``FASTVAE_COMMIT``, where set, names the commit instead: the copy of the working tree that a
    GPU machine gets has no git metadata of its own (or an older commit's)."""
    if os.environ.get("FASTVAE_COMMIT"):
        commit_info.clear()
        commit_info.update(id=os.environ["FASTVAE_COMMIT"], dirty=False, branch=None, time=None)
        return
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).resolve().parent.parent).stdout
    except (OSError, subprocess.CalledProcessError):
        return
    commit_info["dirty"] = any(not line[3:].startswith(SUITE_OUTPUTS) for line in out.splitlines())


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
    config.hook.pytest_benchmark_update_commit_info(config=config, commit_info=commit_info)
    output = config.hook.pytest_benchmark_generate_json(
        config=config, benchmarks=benchmarks, include_data=False,
        machine_info=machine_info, commit_info=commit_info)
    written = _load_report().save_and_render(output)
    if reporter:
        for path in written:
            reporter.write_line(f"fastvae: wrote {path}", green=True)
