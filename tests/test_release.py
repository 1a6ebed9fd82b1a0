"""Release behaviour of the compiled op wheel: a CUDA library that cannot load.

A copy of the installed ``timm_internimage_dcnv3`` package gets a real ``_C_cuda`` shared
library that links a library which does not exist, the way a CUDA 13 wheel looks under a
CUDA 12 torch (``libcudart.so.13`` missing). Imported in a fresh interpreter, the package must
keep its CPU kernels, report the missing library, and log it once at WARNING level when torch
has CUDA (at DEBUG level only with a CPU-only torch).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MISSING = "libtimm_internimage_missing_cudart.so.13"

_CHILD = r"""
import logging, sys
import torch
import timm_internimage_dcnv3 as ext
from timm_internimage_dcnv3 import _ops

assert _ops.__file__.startswith(sys.argv[1]), _ops.__file__
assert ext.built_with_cuda() and not ext.cuda_loaded()
error = ext.cuda_load_error()
assert error and "missing library %s" % sys.argv[2] in error, error
assert ext.supports("cpu", torch.float32) and not ext.supports("cuda", torch.float32)
g = torch.Generator().manual_seed(0)
x = torch.randn(1, 5, 5, 8, generator=g, dtype=torch.float64)
offset = torch.randn(1, 5, 5, 2 * 9 * 2, generator=g, dtype=torch.float64)
mask = torch.softmax(torch.randn(1, 5, 5, 2, 9, generator=g, dtype=torch.float64), -1).flatten(3)
out = ext.dcnv3(x, offset, mask, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, False)
assert out.shape == (1, 5, 5, 8) and bool(torch.isfinite(out).all())
print("CHILD-OK cuda=%s" % torch.version.cuda)
"""


def _installed_package() -> Path:
    spec = importlib.util.find_spec("timm_internimage_dcnv3")
    if spec is None or spec.origin is None:
        pytest.skip("timm-internimage-dcnv3 is not installed")
    return Path(spec.origin).parent


def _compile_shared(cc: str, source: Path, out: Path, *args: str) -> None:
    subprocess.run([cc, "-shared", "-fPIC", str(source), "-o", str(out), *args], check=True, capture_output=True)


@pytest.fixture()
def broken_cuda_package(tmp_path: Path) -> Path:
    """A copy of the installed package whose _C_cuda needs a library that is not there."""
    if sys.platform != "linux":
        pytest.skip("builds an ELF shared library")
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    root = tmp_path / "site"
    package = root / "timm_internimage_dcnv3"
    shutil.copytree(_installed_package(), package, ignore=shutil.ignore_patterns("_C_cuda*", "__pycache__"))
    # A stand-in runtime with the CUDA-style soname, linked into _C_cuda and then removed.
    stub = tmp_path / "stub.c"
    stub.write_text("int timm_internimage_stub(void) { return 1; }\n")
    runtime = tmp_path / "lib" / MISSING
    runtime.parent.mkdir()
    _compile_shared(cc, stub, runtime, f"-Wl,-soname,{MISSING}")
    user = tmp_path / "user.c"
    user.write_text("int timm_internimage_stub(void);\nint timm_internimage_use(void) { return timm_internimage_stub(); }\n")
    _compile_shared(cc, user, package / "_C_cuda.abi3.so", "-Wl,--no-as-needed", str(runtime))
    runtime.unlink()
    return root


def test_cuda_library_that_cannot_load_warns_once_and_cpu_still_works(broken_cuda_package: Path) -> None:
    import torch

    env = dict(os.environ, PYTHONPATH=str(broken_cuda_package))
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(broken_cuda_package), MISSING],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "CHILD-OK" in done.stdout
    # No logging configured in the child: Python's last-resort handler prints WARNING and above.
    lines = [line for line in done.stderr.splitlines() if "CUDA kernels" in line and MISSING in line]
    if torch.version.cuda is not None:
        assert len(lines) == 1, done.stderr
        assert "could not be loaded" in lines[0] and "CPU kernels work" in lines[0]
    else:
        assert lines == [], done.stderr  # CPU-only torch: expected, so a debug line only


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("libcudart.so.13: cannot open shared object file: No such file or directory", "libcudart.so.13"),
        ("/x/_C_cuda.abi3.so: libcudart.so.12: cannot open shared object file", "libcudart.so.12"),
        ("Error loading shared library libcudart.so.13: No such file or directory", "libcudart.so.13"),
        ("dlopen(/x/_C_cuda.abi3.so, 0x0006): Library not loaded: @rpath/libcudart.13.dylib", "libcudart.13.dylib"),
        ("Could not find module 'C:\\env\\timm_internimage_dcnv3\\_C_cuda.pyd' (or one of its dependencies).", None),
        ("/x/_C_cuda.abi3.so: undefined symbol: cudaLaunchKernel", None),
    ],
)
def test_missing_library_is_read_from_the_loader_message(message: str, expected: str | None) -> None:
    _installed_package()
    from timm_internimage_dcnv3._ops import _missing_library

    assert _missing_library(message) == expected
