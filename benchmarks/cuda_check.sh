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
# benchmarks.run sections (default: all but compose, which runs on its own first).
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
echo "== CUDA tests"
timeout "${TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider -m cuda tests > "$OUT/cuda_tests.txt" 2>&1
tail -3 "$OUT/cuda_tests.txt"
echo "== compose, 512 px, 50 steps"
timeout "${COMPOSE_S:-150}" python3 -m benchmarks.compose --size 512 --steps 50 --repeats 2 --skip-shapes \
    > "$OUT/compose512.json" 2>/dev/null
echo "rc=$?"
echo "== CUDA profile"
timeout "${PROFILE_S:-240}" python3 -m benchmarks.run --cuda --skip-shapes --timeout 120 \
    --only ${ONLY:-attention_overhead stylize edit softrepa research_baselines fastpaths sdxl} \
    --output "$OUT/cuda_profile.json" 2>&1 | grep '^\[run\]'
