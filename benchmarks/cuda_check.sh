#!/bin/bash
# The GPU checks in one prepared command, for a lent CUDA machine (see benchmarks/RESULTS.md).
#
# That machine has torch but neither diffusers nor this project's transformers: carry them as
# wheels in .whl/ (ignored by git), downloaded here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 transformers==5.24.0 importlib_metadata==8.7.0 regex==2026.5.9
# then run `bash benchmarks/cuda_check.sh` there with .whl carried. Results go to $OUT (or
# benchmarks/out). Time limits per part keep the whole under about 9 minutes; ONLY picks the
# benchmarks.run sections (default: all but compose, which runs on its own first). The compiled
# part (benchmarks.compiled_speed: each method compiled against stock diffusers compiled in the
# same COMPILE_MODE, first-call compile time included) rewrites its JSON after every method, so
# its time limit keeps what finished; COMPILED_METHODS picks the methods. PARTS picks the parts
# (default: all four), e.g. PARTS="tests compiled".
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)"
PARTS=${PARTS:-tests compose compiled profile}
part() { [[ " $PARTS " == *" $1 "* ]]; }
if part tests; then
    echo "== CUDA tests"
    timeout "${TESTS_S:-120}" python3 -m pytest -q -p no:cacheprovider -m cuda tests > "$OUT/cuda_tests.txt" 2>&1
    tail -3 "$OUT/cuda_tests.txt"
fi
if part compose; then
    echo "== compose, 512 px, 50 steps"
    timeout "${COMPOSE_S:-110}" python3 -m benchmarks.compose --size 512 --steps 50 --repeats 2 --skip-shapes \
        > "$OUT/compose512.json" 2>/dev/null
    echo "rc=$?"
fi
if part compiled; then
    echo "== compiled (mode ${COMPILE_MODE:-default}) vs stock diffusers compiled, 512 px"
    timeout "${COMPILED_S:-180}" python3 -m benchmarks.compiled_speed --size 512 --steps "${COMPILED_STEPS:-20}" \
        --iterations 10 --repeats 3 --mode "${COMPILE_MODE:-default}" \
        --methods ${COMPILED_METHODS:-pass_through stylize edit_dual compose_stage1} \
        --output "$OUT/compiled.json" > /dev/null 2> "$OUT/compiled.err"
    echo "rc=$? (methods finished: $(grep -c '"compiled_speedup"' "$OUT/compiled.json" 2>/dev/null || echo 0))"
fi
if part profile; then
    echo "== CUDA profile"
    timeout "${PROFILE_S:-150}" python3 -m benchmarks.run --cuda --skip-shapes --timeout 120 \
        --only ${ONLY:-attention_overhead stylize edit softrepa research_baselines fastpaths sdxl} \
        --output "$OUT/cuda_profile.json" 2>&1 | grep '^\[run\]'
fi
