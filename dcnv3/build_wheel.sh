#!/usr/bin/env bash
# Build the timm-internimage-dcnv3 wheel (stable ABI, cp310-abi3) against the
# torch installed in the current Python environment.
#
#   bash dcnv3/build_wheel.sh [--cpu | --cuda] [--install] [--outdir DIR]
#
#   --cpu      CPU kernels only (same as TIMM_INTERNIMAGE_DCNV3_CUDA=0)
#   --cuda     require the CUDA kernels (fails without nvcc / a CUDA torch)
#              default: CUDA kernels when nvcc is found and torch has CUDA
#   --install  pip-install the built wheel into the current environment
#   --outdir   where the wheel goes (default: dcnv3/dist)
#   --name     distribution name (default timm-internimage-dcnv3; the release builds the CUDA 12
#              variant as timm-internimage-dcnv3-cu12: same package inside, built from a copy)
#
# Environment: PYTHON (default: python), TORCH_CUDA_ARCH_LIST, MAX_JOBS, CUDA_HOME.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-python}"
case "$py" in */*) py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")" ;; esac
outdir="$here/dist"
install=0
name=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) export TIMM_INTERNIMAGE_DCNV3_CUDA=0 ;;
    --cuda) export TIMM_INTERNIMAGE_DCNV3_CUDA=1 ;;
    --install) install=1 ;;
    --outdir) outdir="$2"; shift ;;
    --name) name="$2"; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$outdir"
outdir="$(cd "$outdir" && pwd)"
src="$here"
if [ -n "$name" ] && [ "$name" != timm-internimage-dcnv3 ]; then
  case "$name" in timm-internimage-dcnv3-*) ;; *) echo "--name must start with timm-internimage-dcnv3-" >&2; exit 2 ;; esac
  src="$(mktemp -d)/dcnv3"
  trap 'rm -rf "$(dirname "$src")"' EXIT
  mkdir -p "$src"
  (cd "$here" && tar --exclude=./build --exclude=./dist --exclude='./*.egg-info' -cf - .) | (cd "$src" && tar -xf -)
  sed -i.orig 's/^name = "timm-internimage-dcnv3"$/name = "'"$name"'"/' "$src/pyproject.toml"
  grep -q "^name = \"$name\"$" "$src/pyproject.toml" || { echo "could not rename the distribution" >&2; exit 1; }
fi
rm -rf "$src/build" "$src"/*.egg-info
# --no-build-isolation: the extension must be compiled against the torch that is installed here.
"$py" -m pip wheel "$src" --no-build-isolation --no-deps -w "$outdir"
wheel="$(ls -t "$outdir"/timm_internimage_dcnv3*.whl | head -n 1)"
echo "built $wheel"
if [ "$install" = 1 ]; then
  "$py" -m pip install --no-deps --force-reinstall "$wheel"
fi
