#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh machine, then run it:
#   - a virtual environment (.venv, or $VENV) with torch $TORCH_VERSION and this package with its test extras
#   - the compiled DCNv3 op, built once for the CPU against that torch and installed
#   - a CUDA compile check of the op's kernels when nvcc is present (no GPU needed)
#   - the test suite, then the tests marked slow (pyproject.toml) as a step of their own
#   - scripts/release_check.sh on that wheel: this package's sdist and wheel, auditwheel show/repair
#     of the op wheel, and the repaired wheel in a fresh environment with torch $OLD_TORCH_VERSION
#     (the wheel is built on the torch stable ABI; this proves it loads on an older torch)
#   - last, the suite's 15 slowest tests
#
#   bash scripts/test.sh [pytest arguments]
#
# Environment: VENV, TORCH_VERSION (default 2.14.1), TORCHVISION_VERSION (0.29.1),
# OLD_TORCH_VERSION (2.13.0; empty skips that check), PYTHON (python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-python3}"
venv="${VENV:-.venv}"
torch_version="${TORCH_VERSION:-2.14.1}"
torchvision_version="${TORCHVISION_VERSION:-0.29.1}"
old_torch_version="${OLD_TORCH_VERSION-2.13.0}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Without a local copy of torch, pip downloads a CUDA build (several GB with its CUDA libraries); its
# cache would hold a second copy of all of it.
export PIP_NO_CACHE_DIR=1

step() { printf '\n== %s\n' "$*"; }

step "environment $venv (torch $torch_version)"
# A run needs about 7.5 GB of disk (7.3 GB measured on a fresh clone): the environment (5.6 GB with a CUDA
# build of torch), the release check's environments and the tests' temporary files.
df -h . | awk 'NR == 2 {print "disk: " $4 " free of " $2}'
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q "torch==$torch_version" "torchvision==$torchvision_version"
"$venv/bin/python" -m pip install -q -e ".[test]"

step "compiled DCNv3 op: CPU wheel"
PYTHON="$venv/bin/python" bash dcnv3/build_wheel.sh --cpu --install --outdir dcnv3/dist
wheel="$(ls -t dcnv3/dist/timm_internimage_dcnv3-*.whl | head -n 1)"

if command -v nvcc >/dev/null 2>&1; then
  step "compiled DCNv3 op: CUDA compile check"
  PYTHON="$venv/bin/python" bash dcnv3/tools/cuda_compile_check.sh
else
  step "compiled DCNv3 op: no nvcc here, CUDA compile check not run"
fi

# The suite without the tests marked slow (torch.compile, torch.export, subprocess runs), then those.
suite_log="$(mktemp)"
trap 'rm -f "$suite_log"' EXIT
pytest_selected() { "$venv/bin/python" -m pytest "$@" || [ $? -eq 5 ]; }  # 5: the selection holds no test
step "test suite"
pytest_selected -q -m "not slow" --durations=15 tests "$@" | tee "$suite_log"
step "slow tests"
pytest_selected -q -m slow tests "$@"

if [ -n "$old_torch_version" ]; then
  # The Linux CPU part of the release workflow on the wheel built above: sdist + wheel of this
  # package (twine check), auditwheel show/repair of the op wheel, and the repaired wheel in a fresh
  # environment with torch $old_torch_version (tests/test_compiled_op.py and tests/test_release.py).
  step "release check (op wheel on torch $old_torch_version)"
  PYTHON="$python" BUILD_PYTHON="$venv/bin/python" bash scripts/release_check.sh --op-wheel "$wheel" --torch "$old_torch_version"
fi

step "the suite's 15 slowest tests"
sed -n '/slowest 15 durations/,/^=/p' "$suite_log" | sed '1d;$d'
