#!/usr/bin/env bash
# The one command of a lent GPU machine (docs/benchmarks.md, "When a GPU is lent"). After
# `bash benchmarks/gpu/fetch.sh` here, one device call:
#
#     command: bash benchmarks/gpu/session.sh      carry: [".whl"]      timeout_s: 590
#
# installs .whl/ into /tmp/site, builds fast_jl there (nvcc, for sm_90), prints the versions and
# the GPU, then runs, each time-boxed (`timeout`) inside one overall budget so that no step can eat
# the others' time, in this order:
#   d  benchmarks/bench_compile_cache.py cifar2 --device cuda --dtype bf16 --runs 2   (a compiled
#      training's compilation from an empty inductor cache and from the one the first run filled:
#      the cost model's compilation and compilation_cached)
#   c  benchmarks/bench_factorized.py speed cifar2 --device cuda --dtype fp32, then tf32   (factorized
#      projection, with the workflow's default split of k, against fast_jl, k = 32768)
#   b  benchmarks/stage_throughput.py cifar2 --device cuda   (training per precision, GT, gradients, projection,
#      DDIM; then training per precision with each speed option, channels_last and compile)
#   a  pytest tests/test_cuda.py -q -x   (the CUDA tests)
# Seen on an H200 (2026-12-04): setup 110 s (fast_jl's build 86), b about 380 s (its units 110, the
# options' three compilations 90 s each), c 34 s, a about 240 s; d not yet run (about 90 s for its
# cold compilation). More than one call's 600 s: the default is d, c and b (b, measured in two
# sessions already, takes what is left, its rates printed as measured); a runs in a second call,
# SESSION_ONLY=a, on the still-warm machine (its setup is then quick: fast_jl already built).
# SESSION_ONLY picks the steps; the script ends with one line per step (ok / failed / timed out /
# skipped, seconds). Logs go to $OUT (set by the device tool; /tmp/gpu-out elsewhere): setup.log,
# fast_jl.log, d_compile_cache.log, c_factorized.log, b_stage_throughput.log, a_test_cuda.log,
# summary.txt; the end of each log is echoed as it finishes.
#
# DIFFATTR_GPU_DRYRUN=1 tests the plumbing on a CPU machine: the same steps on the cpu device with
# the tiny preset; the wheels are installed (by INSTALL_PYTHON, a Python 3.12 like the machine's)
# into SITE but not put on the path, since PYTHON (the one that runs the steps) need not be 3.12.
#     DIFFATTR_GPU_DRYRUN=1 PYTHON=/work/main/.venv/bin/python INSTALL_PYTHON=python3.12 \
#         SITE=/tmp/scratch-site SESSION_BUDGET_S=300 bash benchmarks/gpu/session.sh
set -u -o pipefail
cd "$(dirname "$0")/../.." || exit 1
ROOT=$PWD
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
DRY=${DIFFATTR_GPU_DRYRUN:-0}
PY=${PYTHON:-python3}
INSTALL_PY=${INSTALL_PYTHON:-$PY}
SITE=${SITE:-/tmp/site}
BUDGET=${SESSION_BUDGET_S:-570}  # seconds for everything; the device call's timeout_s should be ~20 s more
CUDA_ARCH=${FAST_JL_ARCH:-9.0}    # H200 (Hopper); nvcc 13 no longer builds fast_jl's own choice, 7.0+PTX
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH=$PATH:/usr/local/cuda/bin; fi
ONLY=${SESSION_ONLY:-dcb}  # the steps to run: SESSION_ONLY=a for the CUDA tests, abcd for all four
SUMMARY=()
want() { case $ONLY in *"$1"*) return 0 ;; esac; return 1; }

if [ "$DRY" = 1 ]; then
  DEVICE=cpu PRESET=tiny STEPS=2
  FACT_ARGS=(--proj-dim 64 --small-k 16 --batch 2)
  CACHE_ARGS=(--dtype fp32 --warm-up 1 --steps 1)
  export PYTHONPATH=$ROOT/src:$ROOT/benchmarks
else
  DEVICE=cuda PRESET=cifar2 STEPS=30
  FACT_ARGS=(--proj-dim 32768 --batch 32)  # featurize.batch_size of cifar2; fast_jl's 32-row kernel
  CACHE_ARGS=(--dtype bf16)  # the precision compile pays in (1.57x, benchmarks/README.md)
  export PYTHONPATH=$ROOT/src:$ROOT/benchmarks:$SITE
fi

# step NAME BOX_SECONDS LOGFILE COMMAND...: run COMMAND under `timeout`, for at most BOX_SECONDS and
# never past the overall budget; output to $OUT/LOGFILE, its end echoed; one summary line kept.
step() {
  local name=$1 box=$2 logname=$3 log=$OUT/$3 left limit start rc status lines
  shift 3
  left=$((BUDGET - SECONDS - 5))
  limit=$((box < left ? box : left))
  if [ "$limit" -lt 15 ]; then
    status="skipped ($((BUDGET - SECONDS))s of the budget left)"
    echo "== $name: $status" | tee -a "$log"
    SUMMARY+=("$(printf '%-20s %-28s %5s  %s' "$name" "$status" "-" "$logname")")
    return 0
  fi
  echo "== $name (at most ${limit}s): $*" >>"$log"
  lines=$(wc -l <"$log")
  echo "== $name (at most ${limit}s): $*"
  start=$SECONDS
  # through bash -c: COMMAND may be one of the functions below (exported), which timeout cannot run itself
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" >>"$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out after ${limit}s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  tail -n +"$((lines + 1))" "$log" | tail -n 30
  echo "== $name: $status, $((SECONDS - start))s" | tee -a "$log"
  SUMMARY+=("$(printf '%-20s %-28s %4ss  %s' "$name" "$status" "$((SECONDS - start))" "$logname")")
}

install_wheels() {
  ls .whl/*.whl >/dev/null || { echo "no .whl/*.whl: run benchmarks/gpu/fetch.sh here first, carry [\".whl\"]"; return 1; }
  "$INSTALL_PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
}

build_fast_jl() {  # fast_jl's setup.py pins TORCH_CUDA_ARCH_LIST to 7.0+PTX: set it to this GPU's
  local src
  if compgen -G "$SITE/fast_jl*.so" >/dev/null; then echo "fast_jl already built in $SITE"; return 0; fi
  src=$(mktemp -d) && tar -xzf .whl/fast_jl-0.1.3.tar.gz -C "$src" || return 1
  sed -i "s/environ\['TORCH_CUDA_ARCH_LIST'\]=\"7.0+PTX\"/environ['TORCH_CUDA_ARCH_LIST']=\"$CUDA_ARCH\"/" \
    "$src/fast_jl-0.1.3/setup.py"
  grep -n TORCH_CUDA_ARCH_LIST "$src/fast_jl-0.1.3/setup.py"
  # needs setuptools and the machine's torch (no build isolation), nvcc; ninja if there (faster); the
  # check imports torch first, which loads the libc10.so that fast_jl links to
  "$PY" -m pip install --no-build-isolation --no-deps --no-cache-dir --upgrade --target "$SITE" "$src/fast_jl-0.1.3" &&
    "$PY" -c "import torch, fast_jl; x = torch.ones(8, 1000, device='cuda'); print('fast_jl', fast_jl.__file__, \
float(fast_jl.project_normal_8(x, 512, 0, torch.cuda.get_device_properties(0).multi_processor_count).abs().sum()))"
}

versions() {
  echo "dry run: ${DRY}; python: $("$PY" -V 2>&1) ($(command -v "$PY")); PYTHONPATH=$PYTHONPATH"
  nvidia-smi -L 2>&1
  nvcc --version 2>&1 | tail -n 2
  "$PY" - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("diffusers", "zarr", "numcodecs", "donfig", "google_crc32c", "trak", "jsonschema", "referencing",
             "rpds", "curvlinops", "fast_jl", "transformers", "peft", "numpy", "scipy", "pandas", "sklearn"):
    try:
        module = importlib.import_module(name)
        print(f"{name:14} {getattr(module, '__version__', '?'):14} {module.__file__}")
    except Exception as error:  # report and go on: the steps say what it breaks
        print(f"{name:14} NOT IMPORTABLE: {type(error).__name__}: {error}")
PY
}

export -f install_wheels build_fast_jl versions
export PY INSTALL_PY SITE CUDA_ARCH DRY
echo "== session.sh $(date -u +%FT%TZ), budget ${BUDGET}s, out $OUT"
step "install wheels" 90 setup.log install_wheels
if [ "$DRY" = 1 ]; then
  echo "== dry run: fast_jl's build is tried with PYTHON's torch (expected to fail without CUDA)"
fi
step "build fast_jl" 180 fast_jl.log build_fast_jl
step versions 60 setup.log versions
want d && step "d compile cache" 240 d_compile_cache.log \
  "$PY" benchmarks/bench_compile_cache.py "$PRESET" --device "$DEVICE" --runs 2 "${CACHE_ARGS[@]}"
for dtype in fp32 tf32; do  # featurize.dtype's choices (tf32 is fp32 on a CPU)
  want c && step "c factorized $dtype" 60 c_factorized.log \
    "$PY" benchmarks/bench_factorized.py speed "$PRESET" --device "$DEVICE" --dtype "$dtype" "${FACT_ARGS[@]}"
done
want b && step "b stage_throughput" 420 b_stage_throughput.log \
  "$PY" benchmarks/stage_throughput.py "$PRESET" --device "$DEVICE" --steps "$STEPS"
want a && step "a test_cuda" 300 a_test_cuda.log "$PY" -m pytest tests/test_cuda.py -q -x -p no:cacheprovider

{
  echo "== summary ($(date -u +%FT%TZ), ${SECONDS}s of ${BUDGET}s; dry run: $DRY; logs in $OUT)"
  printf '%s\n' "${SUMMARY[@]}"
} | tee "$OUT/summary.txt"
