#!/usr/bin/env bash
# Compile the CPU kernels of timm-internimage-dcnv3 for other platforms than this one, with the
# flags setup.py uses there, and check the instruction set of the result. No linking (there is
# no libtorch for those targets here): this proves that the sources and the per-platform ISA
# dispatch compile, not that the wheel works.
#
#   bash dcnv3/tools/cross_compile_check.sh [TARGET ...]
#
# Targets (default: every one whose compiler is found; a missing compiler is reported, not fatal):
#   linux-aarch64        aarch64-linux-gnu-g++ (Debian g++-aarch64-linux-gnu), GCC as in manylinux
#   linux-aarch64-clang  zig's clang (pip package ziglang), --target aarch64-linux-gnu
#   macos-arm64          zig's clang for aarch64-macos (macOS SDK headers, libc++), Apple-clang flags
#   windows-x64-gnu      zig's clang for x86_64-windows-gnu (Windows headers, LLP64; GNU front end)
# Needs llvm-objdump / llvm-nm (Debian: llvm). Checks: the object's architecture; on arm64 no x86 code path and no CPU-feature probe, and
# NEON vector FMAs (fmla on .4s / .2d registers) present in the kernel.
#
# Environment: PYTHON (a Python with torch, for its headers; default python), ZIG (the zig
# command; default: PYTHON -m ziglang when that module is installed).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

zig="${ZIG:-}"
if [ -z "$zig" ] && "$py" -c "import ziglang" >/dev/null 2>&1; then
  zig="$py -m ziglang"
fi
torch_include="$("$py" -c "import torch.utils.cpp_extension as e; print(e.include_paths()[0])")"

compiler_for() {
  case "$1" in
    linux-aarch64) command -v aarch64-linux-gnu-g++ || true ;;
    linux-aarch64-clang) [ -n "$zig" ] && echo "$zig c++ -target aarch64-linux-gnu" || true ;;
    macos-arm64) [ -n "$zig" ] && echo "$zig c++ -target aarch64-macos" || true ;;
    windows-x64-gnu) [ -n "$zig" ] && echo "$zig c++ -target x86_64-windows-gnu" || true ;;
    *) echo "unknown target: $1" >&2; exit 2 ;;
  esac
}

platform_for() {
  case "$1" in
    macos-*) echo darwin ;;
    *) echo linux ;;  # windows-x64-gnu: a GNU-style compiler, so the GCC/Clang flags
  esac
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(linux-aarch64 linux-aarch64-clang macos-arm64 windows-x64-gnu)
status=0
compiled=0
for target in "${targets[@]}"; do
  cxx="$(compiler_for "$target")"
  if [ -z "$cxx" ]; then
    echo "SKIP $target: no compiler (see the header of this script)"
    continue
  fi
  # The flags of setup.py for that platform, probed against that compiler.
  read -r -a flags < <(cd "$here" && CXX="$cxx" "$py" -c "
import setup
print(' '.join(setup._host_flags(['-DTORCH_TARGET_VERSION=' + setup._torch_target_hex()], '$(platform_for "$target")')[0]))")
  obj="$tmp/$target"
  mkdir -p "$obj"
  for src in csrc/dcnv3_op.cpp csrc/cpu/dcnv3_kernel.cpp; do
    # shellcheck disable=SC2086  # $cxx is a command line
    if ! (cd "$here" && $cxx "${flags[@]}" -DPy_LIMITED_API=0x030A0000 -fPIC -I csrc -I "$torch_include" \
        -c "$src" -o "$obj/$(basename "$src").o" 2>"$obj/log"); then
      echo "FAIL $target: $src does not compile:" >&2
      head -n 30 "$obj/log" >&2
      status=1
      continue 2
    fi
  done
  kernel="$obj/dcnv3_kernel.cpp.o"
  desc="$(llvm-objdump -f "$kernel" 2>/dev/null | grep -i -m 1 'file format' || true)"
  desc="${desc##*file format }"
  [ -n "$desc" ] || desc="$(file -b "$kernel")"
  case "$target" in
    *aarch64* | *arm64*)
      if ! grep -qiE 'aarch64|arm64' <<<"$desc"; then
        echo "FAIL $target: not an arm64 object ($desc)" >&2; status=1; continue
      fi
      syms="$(llvm-nm "$kernel" 2>/dev/null || nm "$kernel")"
      if grep -qiE 'cpu_model|cpu_indicator|cpu_features|avx' <<<"$syms"; then
        echo "FAIL $target: x86 dispatch symbols in an arm64 object" >&2; status=1; continue
      fi
      neon="$(llvm-objdump -d "$kernel" 2>/dev/null | grep -cE 'fmla(\s+v[0-9]+)?\.(4s|2d)' || true)"
      if [ "${neon:-0}" -eq 0 ]; then
        echo "FAIL $target: no NEON vector FMA in the kernel (not vectorised?)" >&2; status=1; continue
      fi
      echo "OK   $target: $desc; NEON vector FMAs: $neon; no x86 code path"
      ;;
    windows-*)
      if ! grep -qiE 'coff-x86-64|pe-x86-64|x86-64' <<<"$desc"; then
        echo "FAIL $target: not an x86-64 COFF object ($desc)" >&2; status=1; continue
      fi
      echo "OK   $target: $desc"
      ;;
  esac
  compiled=$((compiled + 1))
done
echo "cross compile check: $compiled target(s) compiled, status $status"
exit "$status"
