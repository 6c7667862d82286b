"""Write and render fastvae's benchmark results.

    pytest benchmarks/ --benchmark-only --fastvae-save          # run, then write everything
    pytest benchmarks/ --benchmark-only --benchmark-json=run.json
    python benchmarks/report.py run.json [--merge]              # the same from a saved run
    python benchmarks/report.py                                 # re-render from results/*.json

For a run it writes ``benchmarks/results/<device>.json`` (the device name slugged, and on CPU
``-<capability>-t<threads>`` appended: ``amd-epyc-avx2-t2.json``; pytest-benchmark's JSON without
the raw timings), then re-renders the results table of every
``benchmarks/results/*.json`` into ``benchmarks/README.md`` between the markers, and for each
device a plot ``benchmarks/results/<device>-speedup.png`` of speed-up over eager against batch
size. ``--merge`` keeps the entries of an existing results file that the new run does not have
(matched by group and provider), for adding one group without rerunning the suite.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
START = "<!-- fastvae-results:start -->"
END = "<!-- fastvae-results:end -->"

MAIN_PROVIDERS = ("eager", "compile", "fastvae")
REFERENCE = "copy"
OP_ORDER = ("elbo-fwd", "elbo-bwd", "elbo-full", "reparam-fwd", "reparam-full")
GROUP_RE = re.compile(r"^(?P<base>.+?)-B(?P<batch>\d+)(?P<suffix>(?:-[A-Za-z0-9_.]+)*)$")
STAT_KEYS = ("min", "max", "mean", "median", "stddev", "iqr", "rounds", "iterations", "ops")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def parse_group(group: str):
    """``"elbo-full-B4096-bf16"`` -> ("elbo-full", 4096, "bf16"); batch None if absent."""
    m = GROUP_RE.match(group or "")
    if not m:
        return group or "", None, ""
    return m["base"], int(m["batch"]), m["suffix"].lstrip("-")


# ---- results files -----------------------------------------------------------------------------

def _torch_info() -> dict:
    try:
        import torch
    except ImportError:
        return {}
    info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        pass
    if torch.version.cuda:
        info["cuda"] = torch.version.cuda
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def result_name(info: dict) -> str | None:
    """The results file a benchmark goes to: its device, and on CPU ATen's dispatch level and
    the thread count (``"AMD EPYC-avx2-t2"``), which change CPU timings a lot."""
    device = info.get("device")
    if device is None:
        return None
    if info.get("device_type") == "cpu":
        cap = info.get("cpu_capability")
        if cap:
            device += f"-{cap.lower()}"
        if info.get("threads"):
            device += f"-t{info['threads']}"
    return device


def trim(run: dict, name: str) -> dict:
    """pytest-benchmark's JSON for one results file (see :func:`result_name`), without raw
    timings."""
    benchmarks = []
    device = name
    for bm in run.get("benchmarks", []):
        info = bm.get("extra_info") or {}
        if result_name(info) not in (None, name):
            continue
        device = info.get("device", device)
        stats = {k: bm["stats"][k] for k in STAT_KEYS if k in bm.get("stats", {})}
        benchmarks.append({"group": bm.get("group"), "name": bm.get("name"),
                           "fullname": bm.get("fullname"),
                           "params": {k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
                                      for k, v in (bm.get("params") or {}).items()},
                           "extra_info": info, "stats": stats})
    machine = run.get("machine_info") or {}
    cpu = machine.get("cpu") or {}
    kinds = {bm["extra_info"].get("device_type") for bm in benchmarks} - {None}
    caps = {bm["extra_info"].get("cpu_capability") for bm in benchmarks} - {None}
    threads = {bm["extra_info"].get("threads") for bm in benchmarks} - {None}
    return {
        "device": device,
        "device_type": kinds.pop() if len(kinds) == 1 else None,
        "cpu_capability": caps.pop() if len(caps) == 1 else None,
        "threads": threads.pop() if len(threads) == 1 else None,
        "datetime": run.get("datetime") or _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "machine_info": {
            "node": machine.get("node"), "machine": machine.get("machine"),
            "system": machine.get("system"), "release": machine.get("release"),
            "python_version": machine.get("python_version"),
            "cpu": cpu.get("brand_raw"), "cpu_count": cpu.get("count"),
            **{k: v for k, v in machine.items() if k in ("torch", "threads", "cpu_capability", "cuda",
                                                            "triton", "other_cpu_load_at_start")},
        },
        "commit_info": {k: (run.get("commit_info") or {}).get(k)
                        for k in ("id", "time", "branch", "dirty")},
        "benchmarks": benchmarks,
    }


def devices_in(run: dict) -> list[str]:
    """The results files (:func:`result_name`) a run's benchmarks go to."""
    names = Counter(result_name(bm.get("extra_info") or {}) for bm in run.get("benchmarks", []))
    names.pop(None, None)
    return [name for name, _ in names.most_common()]


def _merge(old: dict, new: dict) -> dict:
    key = lambda bm: (bm["group"], bm["extra_info"].get("provider"))  # noqa: E731
    have = {key(bm) for bm in new["benchmarks"]}
    new["benchmarks"] = [bm for bm in old.get("benchmarks", []) if key(bm) not in have] + new["benchmarks"]
    return new


def save_and_render(run: dict, merge: bool = False) -> list[Path]:
    """Write results/<device>.json for each device in a pytest-benchmark run, then re-render."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = run.setdefault("machine_info", {})
    for key, value in _torch_info().items():  # the run's own versions, where it recorded them
        info.setdefault(key, value)
    written = []
    for device in devices_in(run):
        results = trim(run, device)
        if not results["benchmarks"]:
            continue
        path = RESULTS / f"{slug(device)}.json"
        if merge and path.exists():
            results = _merge(json.loads(path.read_text()), results)
        path.write_text(json.dumps(results, indent=1, default=str) + "\n")
        written.append(path)
    return written + render_all()


def load_all() -> list[dict]:
    """Every results file written by this script (other JSON files in results/ are skipped)."""
    out = []
    for path in sorted(RESULTS.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not (isinstance(data, dict) and isinstance(data.get("benchmarks"), list) and "device" in data):
            continue
        data["_slug"] = path.stem
        out.append(data)
    return out


# ---- table ---------------------------------------------------------------------------------------

def _group_key(group: str):
    base, batch, suffix = parse_group(group)
    order = OP_ORDER.index(base) if base in OP_ORDER else len(OP_ORDER)
    return (suffix, order, base, batch or 0)


def _fmt_time(seconds) -> str:
    if seconds is None:
        return "—"
    if seconds >= 1.0:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def _fmt_ratio(r) -> str:
    return "—" if r is None else f"{r:.2f}×"


def _num(v, fmt="{:.1f}") -> str:
    return "—" if v is None else fmt.format(v)


def by_group(results: dict) -> dict:
    """{group: {provider: benchmark}}."""
    groups: dict = {}
    for bm in results.get("benchmarks", []):
        provider = bm["extra_info"].get("provider", bm.get("name"))
        groups.setdefault(bm["group"], {})[provider] = bm
    return groups


def _median(bm):
    return None if bm is None else bm["stats"].get("median")


def speedups(results: dict) -> dict:
    """{group: {provider: median(eager) / median(provider)}} for groups with an eager entry."""
    out = {}
    for group, provs in by_group(results).items():
        base = _median(provs.get("eager"))
        if not base:
            continue
        out[group] = {p: base / _median(bm) for p, bm in provs.items()
                      if p != REFERENCE and _median(bm)}
    return out


def render_table(results: dict) -> str:
    groups = by_group(results)
    extra = sorted({p for provs in groups.values() for p in provs} - set(MAIN_PROVIDERS) - {REFERENCE})
    providers = [p for p in MAIN_PROVIDERS if any(p in g for g in groups.values())] + extra
    has_gbps = any("gbps" in bm["extra_info"] for g in groups.values() for bm in g.values())
    has_mem = any("peak_extra_mib" in bm["extra_info"] for g in groups.values() for bm in g.values())

    head = ["group"] + providers
    if "fastvae" in providers and "compile" in providers:
        head.append("fastvae vs compile")
    gbps_providers = providers + ([REFERENCE] if any(REFERENCE in g for g in groups.values()) else [])
    if has_gbps:
        head.append("GB/s " + " / ".join(gbps_providers))
    if has_mem:
        head.append("peak extra MiB " + " / ".join(providers))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group in sorted(groups, key=_group_key):
        provs = groups[group]
        base = _median(provs.get("eager"))
        row = [f"`{group}`"]
        for p in providers:
            t = _median(provs.get(p))
            cell = _fmt_time(t)
            if t and base and p != "eager":
                cell += f" ({_fmt_ratio(base / t)})"
            row.append(cell)
        if "fastvae vs compile" in head:
            tc, tf = _median(provs.get("compile")), _median(provs.get("fastvae"))
            row.append(_fmt_ratio(tc / tf) if tc and tf else "—")
        if has_gbps:
            row.append(" / ".join(_num((provs[p]["extra_info"].get("gbps") if p in provs else None), "{:.3g}")
                                  for p in gbps_providers))
        if has_mem:
            row.append(" / ".join(_num((provs[p]["extra_info"].get("peak_extra_mib") if p in provs else None),
                                       "{:.0f}") for p in providers))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def render_section(results: dict) -> str:
    m = results.get("machine_info", {})
    c = results.get("commit_info", {})
    bits = [f"{results.get('device_type') or 'device'}"]
    if results.get("device_type") == "cpu":
        if m.get("cpu"):
            bits.append(f"CPU {m['cpu']}")
        cap = results.get("cpu_capability") or m.get("cpu_capability")
        bits.append(f"ATen CPU capability {cap or 'not recorded'}")
        threads = results.get("threads") or m.get("threads")
        if threads:
            bits.append(f"{threads} torch threads")
    if m.get("torch"):
        bits.append(f"torch {m['torch']}")
    if m.get("cuda"):
        bits.append(f"CUDA {m['cuda']}")
    if m.get("triton") and results.get("device_type") == "cuda":
        bits.append(f"triton {m['triton']}")
    if results.get("device_type") == "cuda":
        bits.append("L2 flushed before every call" if any(
            bm["extra_info"].get("l2_flushed") for bm in results.get("benchmarks", []))
            else "L2 not flushed: B <= 4096 is timed from L2")
    when = (results.get("datetime") or "")[:10]
    if when:
        bits.append(when)
    if c.get("id"):
        bits.append(f"commit {c['id'][:10]}{' (dirty)' if c.get('dirty') else ''}")
    load = m.get("other_cpu_load_at_start")
    if load is not None and results.get("device_type") == "cpu":
        bits.append(f"other processes used {load:.2f} cores at the start")
    compile_s = [bm["extra_info"].get("first_call_s") for bm in results.get("benchmarks", [])
                 if bm["extra_info"].get("provider") == "compile"]
    compile_s = [t for t in compile_s if t is not None]
    if compile_s:
        bits.append(f"`compile` first calls (compilation) {sum(compile_s):.1f} s in all")
    slug_ = results.get("_slug") or slug(results.get("device", "device"))
    title = results.get("device", "unknown device")
    if results.get("device_type") == "cpu":
        cap = results.get("cpu_capability") or m.get("cpu_capability")
        threads = results.get("threads") or m.get("threads")
        title += "".join([f", {cap}" if cap else "", f", {threads} threads" if threads else ""])
    return "\n".join([
        f"### {title}",
        "",
        f"{', '.join(bits)}. Median time per call; in brackets the speed-up over `eager` "
        f"(higher is better). Raw data: [`results/{slug_}.json`](results/{slug_}.json).",
        "",
        render_table(results),
        "",
        f"![speed-up over eager against batch size](results/{slug_}-speedup.png)",
    ])


def render_readme(all_results: list[dict]) -> Path:
    body = "\n\n".join(render_section(r) for r in all_results) or "_No results yet._"
    block = f"{START}\n<!-- generated by benchmarks/report.py; do not edit by hand -->\n\n{body}\n\n{END}"
    text = README.read_text(encoding="utf-8") if README.exists() else "# fastvae benchmarks\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n## Results\n\n" + block + "\n"
    README.write_text(text, encoding="utf-8")
    return README


# ---- plot ----------------------------------------------------------------------------------------

def plot(results: dict, path: Path) -> Path | None:
    """Speed-up over eager against batch size: one panel per op and mode."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report.py: matplotlib is not installed; no plot written", file=sys.stderr)
        return None
    series: dict = {}  # base -> (provider, suffix) -> {batch: speed-up}
    for group, sp in speedups(results).items():
        base, batch, suffix = parse_group(group)
        if batch is None:
            continue
        for provider, value in sp.items():
            if provider != "eager":
                series.setdefault(base, {}).setdefault((provider, suffix), {})[batch] = value
    # panels need at least two batch sizes to draw a line
    bases = [b for b in sorted(series, key=lambda b: (OP_ORDER.index(b) if b in OP_ORDER else 99, b))
             if any(len(pts) > 1 for pts in series[b].values())]
    if not bases:
        return None
    ncols = min(3, len(bases))
    nrows = -(-len(bases) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    colors = {"fastvae": "tab:blue", "compile": "tab:orange"}
    styles = {"": "-", "bf16": "--", "fp16": ":"}
    for ax, base in zip(axes.flat, bases):
        batches = set()
        for (provider, suffix), pts in sorted(series[base].items()):
            xs = sorted(pts)
            batches.update(xs)
            label = provider + (f" {suffix}" if suffix else "")
            ax.plot(xs, [pts[x] for x in xs], styles.get(suffix, "-."), marker="o",
                    color=colors.get(provider), label=label)
        ax.axhline(1.0, color="gray", lw=1, ls=":", label="eager")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(batches))
        ax.set_xticklabels([str(b) for b in sorted(batches)])
        ax.set_title(base)
        ax.set_xlabel("batch size")
        ax.set_ylabel("speed-up over eager (×)")
        ax.set_ylim(bottom=0)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(bases):]:
        ax.set_visible(False)
    where = results.get("device", "")
    if results.get("device_type") == "cpu":
        where += "".join([f", {results['cpu_capability']}" if results.get("cpu_capability") else "",
                          f", {results['threads']} threads" if results.get("threads") else ""])
    fig.suptitle(f"fastvae: speed-up over eager PyTorch, {where} ({results.get('device_type') or ''})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_all() -> list[Path]:
    all_results = load_all()
    written = [render_readme(all_results)]
    for results in all_results:
        png = plot(results, RESULTS / f"{results['_slug']}-speedup.png")
        if png:
            written.append(png)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="pytest-benchmark JSON files (--benchmark-json)")
    parser.add_argument("--merge", action="store_true",
                        help="keep entries of the existing results file that the run lacks")
    args = parser.parse_args(argv)
    written = []
    for run_path in args.runs:
        written = save_and_render(json.loads(run_path.read_text()), merge=args.merge)
    if not args.runs:
        written = render_all()
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
