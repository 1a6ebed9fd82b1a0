#!/usr/bin/env bash
# GPU acceptance check of timm-internimage and its compiled DCNv3/DCNv4 ops (scripts/gpu_check.py): CUDA tests,
# op semantics, streams / CUDA graphs / torch.compile, a >2^31-element input, cuda:1, the DCNv4 kernels
# (golden cases, every dtype against the torch backend), op timings (DCNv4 against DCNv3 too) and model
# timings. Prints one markdown table at the end; exits non-zero if any check failed.
#
#   bash scripts/gpu_check.sh [--device cuda|cpu] [--quick] [--only CHECKS] [--json PATH]   (PATH from the repo root)
#
# --device cpu: the same script as a CPU smoke test (CUDA-only checks SKIP, small sizes).
# Installs what is missing first: the newest dcnv3/dist/timm_internimage_dcnv3-*.whl (built with
# dcnv3/build_wheel.sh if there is none) and this package (editable), both with --no-deps.
# Environment: PYTHON (default: python).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
py="${PYTHON:-python}"
case "$py" in */*) py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")" ;; esac
export PIP_DISABLE_PIP_VERSION_CHECK=1

device=cuda
prev=
for arg in "$@"; do
  [ "$prev" = --device ] && device="$arg"
  case "$arg" in --device=*) device="${arg#--device=}" ;; esac
  prev="$arg"
done

# Importable from outside the checkout (the source tree must not stand in for an install).
importable() { (cd / && "$py" -c "import $1" >/dev/null 2>&1); }
say() { echo "[gpu_check] $*" >&2; }
notes=()

if ! importable timm_internimage_dcnv3; then
  wheel="$(ls -t dcnv3/dist/timm_internimage_dcnv3-*.whl 2>/dev/null | head -n 1 || true)"
  if [ -z "$wheel" ]; then
    flag=--cuda; [ "$device" = cpu ] && flag=--cpu
    say "no wheel in dcnv3/dist: building one ($flag)"
    PYTHON="$py" bash dcnv3/build_wheel.sh "$flag" --outdir dcnv3/dist >&2 || say "wheel build failed"
    wheel="$(ls -t dcnv3/dist/timm_internimage_dcnv3-*.whl 2>/dev/null | head -n 1 || true)"
    notes+=("built $flag wheel")
  fi
  if [ -n "$wheel" ] && "$py" -m pip install --no-deps --force-reinstall "$wheel" >&2; then
    notes+=("installed $(basename "$wheel")")
  else
    say "could not install the compiled op wheel; its checks will fail"
  fi
fi

if ! importable timm_internimage; then
  # --no-build-isolation: no network needed when setuptools is installed; else run from the source tree.
  if "$py" -m pip install --no-deps --no-build-isolation -e . >&2; then
    notes+=("installed timm-internimage (editable)")
  else
    say "pip install -e . failed; using the source tree through PYTHONPATH"
    export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
    notes+=("timm-internimage from PYTHONPATH")
  fi
fi

setup_notes=
for note in ${notes[@]+"${notes[@]}"}; do setup_notes="${setup_notes:+$setup_notes, }$note"; done
GPU_CHECK_SETUP_NOTES="$setup_notes" exec "$py" scripts/gpu_check.py "$@"
