#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): installs what a bare GPU machine with torch lacks, then runs
# every step and writes bench/results/gpu-<date>.md. Under 8 minutes on one H100/H200.
#
#   bash bench/gpu_check.sh DATA.tar.gz                      # online GPU machine
#   bash bench/gpu_check.sh DATA.tar.gz --wheels wheels/     # offline: install from a wheel folder
#   bash bench/gpu_check.sh DATA.tar.gz --dry-run            # tiny sizes, any machine (the tests run it)
#   bash bench/gpu_check.sh --download-wheels wheels/        # on a machine with PyPI: fill that folder
#
# DATA.tar.gz: the CIFAR-10 stand-in, train/<class>/<n>.jpg (../shared/data/cifar10-jpg-train.tar.gz).
# Other options go to gpu_check.py (--skip STEP, --augmix-epochs N, --out FILE).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--download-wheels" ]]; then
    # Everything the project, albumentations and imagecorruptions need, at the versions installed
    # here, except the torch family (the GPU machine's own CUDA build stays).
    dir=${2:?usage: bash bench/gpu_check.sh --download-wheels DIR}
    mapfile -t wheels < <(python bench/gpu_check.py --list-wheels)
    pip download --no-deps -d "$dir" "${wheels[@]}"
    pip wheel --no-deps -w "$dir" airbench==0.1.8             # an sdist on PyPI: build it here
    du -sh "$dir"
    exit 0
fi
data=${1:?usage: bash bench/gpu_check.sh DATA.tar.gz [--wheels DIR] [gpu_check.py options]}
shift
pip_args=(--quiet)
if [[ "${1:-}" == "--wheels" ]]; then
    pip_args+=(--no-index --find-links "${2:?--wheels needs a folder}")
    shift 2
fi
if [[ " $* " != *" --dry-run "* ]]; then
    python -c "import albumentations" 2>/dev/null || pip install "${pip_args[@]}" albumentations
    python -c "import imagecorruptions" 2>/dev/null || pip install "${pip_args[@]}" --no-deps imagecorruptions==1.1.2
    python -c "import airbench" 2>/dev/null || pip install "${pip_args[@]}" --no-deps airbench==0.1.8 \
        || echo "airbench could not be installed: its step will say so"
    # Always (a no-op when everything is there): from the repository root `import competition`
    # would succeed without timm, accelerate & co. Offline, the machine's own setuptools builds it.
    if [[ " ${pip_args[*]} " == *" --no-index "* ]]; then pip_args+=(--no-build-isolation); fi
    pip install "${pip_args[@]}" -e .
fi
exec python bench/gpu_check.py --data "$data" "$@"
