#!/usr/bin/env bash
# What the GPU machine checks and times: PARTS (default "bench tests", 5 minutes on an H200) picks among
#   sweep  the weight-only kernels' configs at decode shapes and the prefill paths (3-5 minutes, for retuning
#          GEMV_CONFIGS, FMA_CONFIGS, the int8 tiers and CUDA_DEQUANTIZED_GEMM_MIN_M; SWEEP=1 adds it to the
#          default parts; SWEEP_PARTS="prefill int8" runs some of its parts: int4, int8, prefill),
#   bench  the weight-only and float8 GEMMs, the fused int8 GEMMs and a W8A8 linear under backend="quanto",
#   tests  the CUDA cases of every test file (under 2 minutes with pytest-xdist, which the GPU machine has;
#          the whole log goes to $out/gpu_tests.log).
# A device call may run 10 minutes; the default parts and then PARTS=sweep fit two. Logs go to $OUT (or /tmp).
#
# The GPU machine cannot install from a registry: build the wheel here first
# (pip wheel --no-deps --no-build-isolation . -w dist) and carry dist/. Unpacked there, it brings the
# package as installed (passes/ and backend/ inside quanto_fx, the backend's entry point).
# Run from the repository root: bash bench/gpu_all.sh
set -u
out="${OUT:-/tmp}"
site=$(mktemp -d)
python3 -m zipfile -e dist/quanto_fx-*.whl "$site"
export PYTHONPATH="$site"  # a script's own folder (bench/), not the repository root, leads sys.path
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
parts="${PARTS:-bench tests}"
if [ "${SWEEP:-0}" = 1 ]; then
    parts="sweep $parts"
fi
case " $parts " in *" sweep "*)
    timeout "${SWEEP_TIMEOUT:-420}" python3 bench/gpu_weight_only_sweep.py ${SWEEP_PARTS:-} 2>&1 \
        | tee "$out/gpu_weight_only_sweep.log"
esac
case " $parts " in *" bench "*)
    timeout 150 python3 bench/gpu_weight_only.py 2>&1 | tee "$out/gpu_weight_only.log"
    timeout 140 python3 bench/gpu_kernels.py 2>&1 | tee "$out/gpu_kernels.log"
esac
case " $parts " in *" tests "*)
    # From a copy: in the repository root, its quanto_fx/ (no passes/ inside) would shadow the wheel's.
    # Every test file's CUDA cases; in parallel where pytest-xdist is installed (Triton's compiles dominate).
    tests=$(mktemp -d)
    cp -r tests pyproject.toml "$tests"
    parallel=""
    if python3 -c "import xdist" 2>/dev/null; then
        parallel="-n ${TEST_WORKERS:-8}"
    fi
    (cd "$tests" && timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider $parallel -rfE \
        --tb=short -k "cuda or gpu" tests) > "$out/gpu_tests.log" 2>&1
    tail -n 40 "$out/gpu_tests.log"
esac
