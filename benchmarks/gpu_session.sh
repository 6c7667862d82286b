#!/usr/bin/env bash
# Everything fastvae checks on a lent GPU machine, in one call (the lease is short: 15 minutes of
# device time, a minute or two of it to start the machine). Run from the repository root:
#
#     bash benchmarks/gpu_session.sh [SECONDS]
#
# with Fashion-MNIST's four IDX .gz files in .data/fashion-mnist (git-ignored; carried along).
# Through the device tool (at most 8 files come back from $OUT, so pack them; the copy of the
# working tree there has no git metadata of its own, so name the commit):
#
#     R=$OUT; FASTVAE_COMMIT=<sha> OUT=/tmp/fv bash benchmarks/gpu_session.sh 540; tar -C /tmp -czf $R/gpu.tgz fv
#
# (carry: [".data"]; timeout_s 600). Both runs of 2026-11-26 are described in benchmarks/README.md.
# Each step has its own deadline, so whatever finishes comes back even if a later step overruns;
# SECONDS (default 540) is the whole budget; TESTS_S, BENCH_S cap the test and benchmark steps,
# BENCH_K selects benchmarks (pytest -k), BENCH_RESERVE (default 50) is what the benchmark step
# leaves to the training steps, TRAIN_S=0 skips the 10-epoch run. Logs and results go
# to $OUT (default /tmp/fastvae-gpu):
#
#   env.txt            GPU, driver, Python, torch, triton, llvmlite
#   tests.log          the whole test suite with compiled kernels (pytest -n, xdist), tests.xml
#   bench-kernels.json the pytest-benchmark run of benchmarks/test_bench_kernels.py (python
#                      benchmarks/report.py FILE --merge turns it into benchmarks/results/<gpu>.json
#                      and the README table)
#   train.log          fastvae.train, 10 epochs of Fashion-MNIST, and benchmarks/compare_train.py
#   ncu.txt            Nsight Compute's speed-of-light and occupancy of the ELBO kernels
#
# The machine has no network: the project is installed with --no-deps over its own torch/triton.
set -u
BUDGET=${1:-540}
OUT=${OUT:-/tmp/fastvae-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/steps.txt"; }
# run STEP-SECONDS RESERVE-SECONDS cmd...: at most STEP seconds, and never into the last RESERVE
step() {
    local want=$1 reserve=$2; shift 2
    local t=$(( $(left) - reserve ))
    (( t > want )) && t=$want
    if (( t < 10 )); then stamp "skipped (no time left): $*"; return 0; fi
    stamp "start (${t} s): $*"
    timeout -s INT -k 15 "$t" "$@"
    stamp "rc=$? $1"
}

stamp "environment"
{
    nvidia-smi
    $PY - <<'EOF'
import sys, torch, triton
print("python", sys.version)
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
p = torch.cuda.get_device_properties(0)
print(torch.cuda.get_device_name(0), p.multi_processor_count, "SMs", getattr(p, "L2_cache_size", "?"), "B L2")
EOF
    $PY -m pip list 2>/dev/null | grep -iE "^(llvmlite|numba|pytest|pytest-xdist|pytest-timeout|pytest-benchmark|matplotlib|tqdm|mlxtend|numpy) "
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stamp "install"
# pyproject.toml names the build backend, so this editable install needs no network
if ! $PY -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1; then
    tail -n 5 "$OUT/install.log"
    stamp "install failed: fastvae.kernels linked into the source tree instead"
    ln -sfn ../kernels fastvae/kernels
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import fastvae; assert fastvae.triton_available(), fastvae._backend.triton_unavailable_reason(); print('fastvae', fastvae.__file__, 'kernels import')" || stamp "THE KERNELS DO NOT IMPORT"

# 1. parity: the whole suite, the Triton kernels compiled (conftest sets no TRITON_INTERPRET on a
#    GPU machine), fp32/bf16/fp16; the gpu-marked tests run torch.compile and CUDA graphs
# (the files that run CUDA first: what runs before a deadline is what the GPU adds over CI)
GPU_FIRST="test_compile test_elbo test_likelihoods test_reparam test_iwae test_porting test_train test_model test_cli"
FILES=$(for f in $GPU_FIRST; do echo tests/$f.py; done; ls tests/test_*.py | grep -vE "$(echo $GPU_FIRST | tr ' ' '|')")
step ${TESTS_S:-240} 110 $PY -m pytest $FILES -q -n ${WORKERS:-16} -p no:cacheprovider --timeout 180 -rfEs \
    --durations 25 --junitxml "$OUT/tests.xml" > "$OUT/tests.log" 2>&1
tail -n 40 "$OUT/tests.log"

# 2. the benchmark suite (BENCH_K: a pytest -k expression to run part of it, e.g. "fastvae");
#    pytest-benchmark writes its JSON also when the deadline interrupts it
step ${BENCH_S:-200} ${BENCH_RESERVE:-50} $PY -m pytest benchmarks/test_bench_kernels.py -p no:cacheprovider -q --benchmark-only \
    --benchmark-max-time 0.25 --benchmark-min-rounds 5 ${BENCH_K:+-k "$BENCH_K"} \
    --benchmark-json "$OUT/bench-kernels.json" > "$OUT/bench-kernels.log" 2>&1
tail -n 3 "$OUT/bench-kernels.log"

# 3. end to end: 10 epochs of Fashion-MNIST with fastvae.train (each step one CUDA graph, the
#    default; then eager steps), then the side-by-side epoch timing against the seed-style loop
{
    step ${TRAIN_S:-40} 50 $PY -m fastvae train --dataset fashion-mnist --data-dir .data/fashion-mnist --epochs 10 \
        --device cuda --no-progress --no-figures --out /tmp/run-fmnist --overwrite
    step ${TRAIN_S:-40} 50 $PY -m fastvae train --dataset fashion-mnist --data-dir .data/fashion-mnist --epochs 10 \
        --device cuda --no-cuda-graph --no-progress --no-figures --out /tmp/run-fmnist-eager --overwrite
    step 45 5 $PY benchmarks/compare_train.py --dataset fashion-mnist --data-dir .data/fashion-mnist \
        --epochs 2 --device cuda --out "$OUT/train-cuda.json"
} > "$OUT/train.log" 2>&1
tail -n 25 "$OUT/train.log"

# 4. Nsight Compute on the single-pass ELBO (B = 65536, fp32), if time is left
cat > /tmp/ncu_elbo.py <<'EOF'
import torch, fastvae
g = torch.Generator(device="cuda").manual_seed(0)
r = torch.randn(65536, 784, device="cuda", generator=g, requires_grad=True)
x = torch.rand(65536, 784, device="cuda", generator=g)
mu = torch.randn(65536, 20, device="cuda", generator=g, requires_grad=True)
lv = torch.randn(65536, 20, device="cuda", generator=g, requires_grad=True)
for _ in range(2):
    torch.autograd.grad(fastvae.elbo_loss(r, x, mu, lv), (r, mu, lv))
torch.cuda.synchronize()
EOF
step 25 0 ncu --clock-control none -k regex:elbo --section SpeedOfLight --section Occupancy \
    --section LaunchStats -c 4 $PY /tmp/ncu_elbo.py > "$OUT/ncu.txt" 2>&1
grep -E "^  _|DRAM Throughput|Memory Throughput|Achieved Occupancy|Duration|Registers Per" "$OUT/ncu.txt" | head -40
stamp "done"
