#!/usr/bin/env bash
# Fast CUDA compile check for CI (no GPU needed): builds the CUDA extension of
# timm-internimage-dcnv3 for a single architecture with exactly the flags of
# the real build, into a temporary directory, then checks that both libraries
# use nothing but the torch stable ABI.
#
#   bash dcnv3/tools/cuda_compile_check.sh [ARCH]     (default ARCH: 8.0)
#
# Needs nvcc and a CUDA build of torch in the current Python (PYTHON, default python).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python}"
case "$py" in */*) py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")" ;; esac
arch="${1:-8.0}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cd "$here"
TORCH_CUDA_ARCH_LIST="$arch" TIMM_INTERNIMAGE_DCNV3_CUDA=1 \
  "$py" setup.py -q build_ext --build-temp "$tmp/temp" --build-lib "$tmp/lib"
status=0
for lib in "$tmp"/lib/timm_internimage_dcnv3/_C*.so; do
  # Any undefined C++ symbol from c10/ATen/torch means a non-stable API slipped in.
  bad="$(nm -D --undefined-only "$lib" | awk '{print $NF}' | c++filt | grep -E '(^|[^a-z_])(c10|at|torch)::' || true)"
  if [ -n "$bad" ]; then
    echo "error: $(basename "$lib") uses symbols outside the torch stable ABI:" >&2
    echo "$bad" >&2
    status=1
  fi
done
ls "$tmp"/lib/timm_internimage_dcnv3/_C_cuda*.so >/dev/null
[ "$status" = 0 ] && echo "CUDA compile check passed (sm_${arch/./}), stable-ABI symbols only"
exit "$status"
