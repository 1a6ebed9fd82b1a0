"""Build of timm-internimage-dcnv3: one stable-ABI, abi3 wheel per platform and CUDA major.

Environment variables:
  TIMM_INTERNIMAGE_DCNV3_CUDA   auto (default) | 0 (CPU-only) | 1 (require CUDA)
  TORCH_CUDA_ARCH_LIST          CUDA archs; default: all of Turing..Blackwell that nvcc supports
  TIMM_INTERNIMAGE_DCNV3_TORCH_TARGET  stable-ABI target, "2.10" by default
  MAX_JOBS                      parallel compile jobs (ninja)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def _cuda_home_from_nvcc() -> str | None:
    """Toolkit root of the nvcc on PATH (which may be a wrapper script elsewhere)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cu"
        src.write_text("__global__ void probe() {}\n")
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-c", str(src), "-o", str(Path(tmp) / "probe.o")],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError):
            out = None
    if out is not None:
        m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
        if m:
            return str(Path(m.group(1).strip()).resolve())
    return str(Path(os.path.realpath(nvcc)).parent.parent)


def _want_cuda() -> bool:
    mode = os.environ.get("TIMM_INTERNIMAGE_DCNV3_CUDA", "auto").strip().lower()
    if mode in ("0", "false", "no", "off", "cpu"):
        return False
    if not os.environ.get("CUDA_HOME") and shutil.which("nvcc"):
        home = _cuda_home_from_nvcc()
        if home:
            os.environ["CUDA_HOME"] = home
    import torch

    home = os.environ.get("CUDA_HOME", "")
    have = bool(home) and os.path.exists(os.path.join(home, "bin", "nvcc")) and torch.version.cuda is not None
    if mode in ("1", "true", "yes", "on", "cuda") and not have:
        raise RuntimeError(
            "TIMM_INTERNIMAGE_DCNV3_CUDA=1 but no CUDA build is possible "
            f"(nvcc/CUDA_HOME: {os.environ.get('CUDA_HOME')}, torch.version.cuda: {torch.version.cuda})"
        )
    return have


def _default_arch_list() -> str:
    """Turing (7.5) .. Blackwell that the toolkit supports, PTX for the newest."""
    wanted = ["7.0", "7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "11.0", "12.0"]
    try:
        out = subprocess.run(
            [os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"), "--list-gpu-arch"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        have = {a.split("_")[1] for a in out.split()}
        archs = [a for a in wanted if a.replace(".", "") in have]
    except (OSError, subprocess.SubprocessError, KeyError, IndexError):
        archs = wanted[1:]
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def _torch_target_hex() -> str:
    major, minor = os.environ.get("TIMM_INTERNIMAGE_DCNV3_TORCH_TARGET", "2.10").split(".")[:2]
    return f"0x{int(major):02x}{int(minor):02x}000000000000"


# GCC/Clang options used where the compiler accepts them (probed, so Apple clang and
# GCC each keep theirs): -fno-trapping-math lets the stencil's selects become vector
# blends, -fno-loop-unroll-and-jam (GCC) keeps two points' channel loops from being
# fused into one scalar loop, -fopenmp-simd honours `#pragma omp simd` without OpenMP.
_OPTIONAL_UNIX_FLAGS = ["-fno-math-errno", "-fno-trapping-math", "-fno-loop-unroll-and-jam", "-fopenmp-simd"]


def _compiler_accepts(flag: str) -> bool:
    """Whether the C++ compiler the extension builder uses ($CXX, else c++) accepts ``flag``."""
    cxx = os.environ.get("CXX", "c++").split()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cpp"
        src.write_text("int probe() { return 0; }\n")
        try:
            done = subprocess.run(
                [*cxx, flag, "-Werror", "-c", str(src), "-o", str(Path(tmp) / "probe.o")],
                capture_output=True,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError):
            return False
    return done.returncode == 0


def _host_flags(common: list[str], platform: str = sys.platform) -> tuple[list[str], list[str]]:
    """C++ compile and link flags for ``platform``'s compiler: MSVC, Apple clang or GCC/Clang.

    ``platform`` is a ``sys.platform`` value; ``tools/cross_compile_check.sh`` passes another
    platform's to compile the CPU kernels for it with the flags its build uses.
    """
    if platform == "win32":
        # MSVC: /O2 and /MD come from setuptools and torch; `#pragma omp simd` is ignored
        # (torch passes /wd4068) and MSVC's auto-vectoriser handles the loops on its own.
        return ["/O2", "/std:c++17", "/fp:precise", "/Zc:__cplusplus", *common], []
    flags = ["-O3", "-g0", "-std=c++17", "-fvisibility=hidden"]
    flags += [f for f in _OPTIONAL_UNIX_FLAGS if _compiler_accepts(f)]
    if platform == "darwin":
        return [*flags, *common], ["-Wl,-x"]  # ld64: strip local symbols
    return [*flags, *common], ["-s"]  # strip: keeps the wheel small


def _extensions(use_cuda: bool) -> list:
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    target = _torch_target_hex()
    common = [f"-DTORCH_TARGET_VERSION={target}"]  # Py_LIMITED_API: added by py_limited_api=True
    cxx, ldflags = _host_flags(common)
    exts = [
        CppExtension(
            "timm_internimage_dcnv3._C",
            sources=["csrc/dcnv3_op.cpp", "csrc/cpu/dcnv3_kernel.cpp"],
            include_dirs=[str(HERE / "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=ldflags,
            py_limited_api=True,
        )
    ]
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _default_arch_list())
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        nvcc = ["-O3", "-DUSE_CUDA", *common]
        if sys.platform != "win32":
            # Windows: torch's builder passes its own -std to nvcc (a second one is an error), and
            # a quoted string in a -D does not survive the Windows command line: the error
            # message for a GPU without a kernel image then says "unknown" instead of the list.
            nvcc += ["-std=c++17", "-DDCNV3_CUDA_ARCHS=\"" + arch_list.replace(" ", "").replace('"', "") + "\""]
        exts.append(
            CUDAExtension(
                "timm_internimage_dcnv3._C_cuda",
                sources=["csrc/cuda/dcnv3_kernel.cu"],
                include_dirs=[str(HERE / "csrc")],
                extra_compile_args={"cxx": [*cxx, "-DUSE_CUDA"], "nvcc": nvcc},
                extra_link_args=ldflags,
                py_limited_api=True,
            )
        )
    return exts


def _write_build_info(use_cuda: bool) -> None:
    """Records what the libraries were built for (read by supports() at run time)."""
    import torch

    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") if use_cuda else None
    text = (
        '"""Generated by setup.py: what the compiled libraries were built for."""\n\n'
        f"BUILD_TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_TARGET_VERSION = {os.environ.get('TIMM_INTERNIMAGE_DCNV3_TORCH_TARGET', '2.10')!r}\n"
        f"CUDA_VERSION = {torch.version.cuda if use_cuda else None!r}\n"
        f"CUDA_ARCH_LIST = {archs!r}\n"
    )
    (HERE / "timm_internimage_dcnv3" / "_build_info.py").write_text(text)


def main() -> None:
    # Must run before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import.
    use_cuda = _want_cuda()
    from torch.utils.cpp_extension import BuildExtension

    exts = _extensions(use_cuda)  # sets the default TORCH_CUDA_ARCH_LIST
    _write_build_info(use_cuda)

    setup(
        ext_modules=exts,
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )


if __name__ == "__main__":
    main()
