"""benchmarks/cpu_fallback.py: what it measures and reports (not how fast)."""
import pytest
import torch

from benchmarks import cpu_fallback
from benchmarks.cpu_fallback import _child, _floor, _minor_faults, _rotation


def test_floor_is_one_pass_writing_a_new_d_recon():
    g = torch.Generator().manual_seed(0)
    r, x = torch.randn(300, 784, generator=g), torch.rand(300, 784, generator=g)
    d = _floor(r, x)
    assert torch.equal(d, r - x)
    assert d.data_ptr() not in (r.data_ptr(), x.data_ptr())


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_child_times_every_provider(likelihood, capsys):
    res = _child([3], 0.0, likelihood)
    assert list(res) == [3]
    r = res[3]
    assert r["rounds"] == 5  # the minimum, for a budget of 0 s
    for key in ("median", "min", "first"):
        assert set(r[key]) == {"eager", "compile", "fastvae", "floor"}
        assert all(v > 0 for v in r[key].values())
    assert set(r["faults"]) == {"eager", "compile", "fastvae", "floor"}
    assert all(v >= 0 for v in r["faults"].values())
    assert all(r["min"][n] <= r["median"][n] for n in r["min"])
    line = capsys.readouterr().out
    speedup = r["median"]["eager"] / r["median"]["fastvae"]
    assert "B=3 rounds=5" in line and f"fastvae vs eager {speedup:.2f}x" in line


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_rotation_puts_each_provider_after_every_other(n):
    names = [f"p{k}" for k in range(n)]
    rows = n if n % 2 == 0 else 2 * n
    orders = [_rotation(names, i) for i in range(rows)]
    assert all(sorted(o) == names for o in orders)
    # within the rounds of one cycle, each ordered pair of providers is adjacent equally often
    pairs = [(a, b) for o in orders for a, b in zip(o, o[1:])]
    want = [(a, b) for a in names for b in names if a != b]
    assert sorted(pairs) == sorted(want * (len(pairs) // len(want)))
    assert _rotation(names, rows) == orders[0]


def _thp_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(cpu_fallback.resource is None, reason="no resource module on this platform")
@pytest.mark.skipif(_thp_always(), reason="transparent huge pages always on: 2 MiB pages, fewer faults")
def test_minor_faults_count_fresh_pages():
    """Touching every 4 KiB page of a fresh 32 MiB buffer faults each of its 8,192 pages in once."""
    import mmap
    buf = mmap.mmap(-1, 32 << 20)  # anonymous: new pages, not memory the allocator already holds
    try:
        f0 = _minor_faults()
        for i in range(0, len(buf), 4096):
            buf[i] = 1
        assert _minor_faults() - f0 >= 8192 * 0.9
    finally:
        buf.close()


def test_floor_buffer_asks_for_huge_pages(monkeypatch):
    """The floor's d recon gets the huge-page advice fastvae's own gradient buffers get (so the
    floor pays no more page faults than fastvae could), with the same values."""
    from fastvae import _memory

    advised = []
    real = _memory.advise_huge_pages
    monkeypatch.setattr(_memory, "advise_huge_pages", lambda t: advised.append(t.data_ptr()) or real(t))
    g = torch.Generator().manual_seed(1)
    r, x = torch.randn(1400, 784, generator=g), torch.rand(1400, 784, generator=g)
    d = _floor(r, x)
    assert advised == [d.data_ptr()]
    assert torch.equal(d, r - x)


@pytest.mark.parametrize("thp", [False, True])
def test_thp_flag_sets_pytorchs_variable_in_the_children(monkeypatch, thp):
    """--thp runs every (level, threads) child with THP_MEM_ALLOC_ENABLE=1; without it the
    children inherit the environment as it is."""
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    envs = []

    class Done:
        returncode = 0

    monkeypatch.setattr(cpu_fallback.subprocess, "run", lambda cmd, env: envs.append(env) or Done())
    argv = ["--levels", "avx2", "--threads", "1,2"] + (["--thp"] if thp else [])
    assert cpu_fallback.main(argv) == 0
    assert [(e["ATEN_CPU_CAPABILITY"], e["FASTVAE_THREADS"]) for e in envs] == [("avx2", "1"), ("avx2", "2")]
    assert all(e.get("THP_MEM_ALLOC_ENABLE") == ("1" if thp else None) for e in envs)


@pytest.mark.parametrize("user_dir", [None, "/somewhere/inductor"])
def test_each_level_gets_an_inductor_cache_of_its_own(monkeypatch, user_dir):
    """Each level's children compile into their own Inductor cache (benchmarks/levels.py: a
    process at one level aborted on what another level had cached), under the caller's
    TORCHINDUCTOR_CACHE_DIR where one is set."""
    if user_dir is None:
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", user_dir)
    envs = []

    class Done:
        returncode = 0

    monkeypatch.setattr(cpu_fallback.subprocess, "run", lambda cmd, env: envs.append(env) or Done())
    assert cpu_fallback.main(["--levels", "avx2,avx512", "--threads", "1,2"]) == 0
    dirs = [e["TORCHINDUCTOR_CACHE_DIR"] for e in envs]
    assert dirs[0] == dirs[1] and dirs[2] == dirs[3] and dirs[0] != dirs[2]
    assert [d.rsplit("/", 1)[-1] for d in dirs[::2]] == ["aten-avx2", "aten-avx512"]
    if user_dir is not None:
        assert all(d.startswith(user_dir + "/") for d in dirs)
    assert [e["ATEN_CPU_CAPABILITY"] for e in envs] == ["avx2", "avx2", "avx512", "avx512"]
