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
import tempfile
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
PY_LIMITED_API = "0x030A0000"  # CPython 3.10


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


def _extensions(use_cuda: bool) -> list:
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    target = _torch_target_hex()
    common = [f"-DTORCH_TARGET_VERSION={target}"]  # Py_LIMITED_API: added by py_limited_api=True
    cxx = ["-O3", "-g0", "-std=c++17", "-fvisibility=hidden", "-fno-math-errno", "-fno-trapping-math", "-fno-loop-unroll-and-jam", "-fopenmp-simd", *common]
    ldflags = ["-s"]  # strip: keeps the wheel small
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
        archs_macro = "-DDCNV3_CUDA_ARCHS=\"" + arch_list.replace(" ", "").replace('"', "") + "\""
        exts.append(
            CUDAExtension(
                "timm_internimage_dcnv3._C_cuda",
                sources=["csrc/cuda/dcnv3_kernel.cu"],
                include_dirs=[str(HERE / "csrc")],
                extra_compile_args={
                    "cxx": [*cxx, "-DUSE_CUDA"],
                    "nvcc": ["-O3", "-std=c++17", "-DUSE_CUDA", archs_macro, *common],
                },
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
