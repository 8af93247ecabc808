#!/usr/bin/env bash
# Every check that needs a GPU, as one prepared run (issue 6: the CUDA kernels).
#
#   bash benches/gpu_check.sh fetch   # here, with network: fills .gpu/ (git-ignored)
#   bash benches/gpu_check.sh         # on the GPU machine, with .gpu/ beside the tree
#
# `fetch` downloads the wheels a bare CUDA image with torch lacks (keras and
# the packages keras needs that such images seldom have), for Python 3.12,
# and copies MNIST for the end-to-end step; it installs nothing here.
# The run then, on the GPU machine:
#   1. installs those wheels into /tmp/site (no network needed);
#   2. builds torchdp_keras._C in place against that machine's torch and nvcc
#      (CPU and CUDA kernels);
#   3. runs tests/ops/test_fused_ops.py, the CUDA cases included (CPU/GPU bit
#      equality of the noise, the clipped sum against the one-example
#      reference, grid-stride coverage, opcheck, torch.compile, a DP step on
#      both devices);
#   4. runs benches/bench_fused_ops.py on the GPU: achieved bandwidth against
#      the device's copy bandwidth, kernel launches per call and per DP step.
# Logs and the bench's JSON go to $OUT (or gpu_check_out/). Exit status: the
# tests' (the bench only reports).
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "fetch" ]]; then
    set -e
    mkdir -p .gpu
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .gpu \
        "keras==$(python3 -c 'import importlib.metadata as m; print(m.version("keras"))')" \
        namex optree
    cp "${MNIST:-../shared/data/mnist.npz}" .gpu/mnist.npz
    ls -l .gpu
    exit 0
fi

out="${OUT:-gpu_check_out}"
mkdir -p "$out"
export KERAS_BACKEND=torch PYTHONUNBUFFERED=1
if compgen -G ".gpu/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .gpu/*.whl || exit 1
    export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    nvcc --version | tail -1
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
        torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
} 2>&1 | tee "$out/env.txt"

# Only the GPU present: building for it alone keeps nvcc short.
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    TORCH_CUDA_ARCH_LIST=$(python3 -c "import torch; print('%d.%d' %
        torch.cuda.get_device_capability() if torch.cuda.is_available() else '')")
    export TORCH_CUDA_ARCH_LIST
fi
python3 setup.py -q build_ext --inplace >"$out/build.txt" 2>&1
tail -3 "$out/build.txt"
python3 -c "from torchdp_keras import ops; print(ops.extension_info())" 2>&1 | tee -a "$out/env.txt"

python3 -m pytest -q -p no:cacheprovider tests/ops/test_fused_ops.py -rs 2>&1 | tee "$out/tests.txt"
status=${PIPESTATUS[0]}

data=.gpu/mnist.npz
[[ -f "$data" ]] || data=../shared/data/mnist.npz
python3 benches/bench_fused_ops.py --device cuda --rounds 11 --data "$data" \
    --json "$out/fused_cuda.json" 2>&1 | grep -v USDT | tee "$out/bench.txt"
exit "$status"
