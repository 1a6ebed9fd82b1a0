"""Runs the DCNv3 and DCNv4 CUDA kernel bodies on the host (see emulate.cpp and cuda_shim.h).

``build()`` compiles ``emulate.cpp`` (which ``#include``s ``csrc/cuda/dcnv3_kernels.cuh`` and
``dcnv4_kernels.cuh``) with g++ into a cache directory, once per source hash, in two flavours: ``'opt'`` (-O2)
and ``'sanitized'`` (ASan + UBSan, every error fatal). ``Emulator(binary)(input, offset, mask, grad_output,
*op_args)`` runs forward and backward of one DCNv3 case through the binary and returns the four result tensors;
``Emulator(binary).packed(input, offset_mask, grad_output, *op_args)`` does the same for DCNv4.

No torch library is linked: only the header-only c10::Half / c10::BFloat16 from torch's include directory are
used. The cache directory is ``$DCNV3_CUDA_EMULATION_CACHE`` or ``dcnv3/build/cuda_emulation``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Sequence

import torch

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent.parent / 'csrc'
SOURCES = (HERE / 'emulate.cpp', HERE / 'cuda_shim.h', CSRC / 'cuda' / 'dcnv3_kernels.cuh',
           CSRC / 'cuda' / 'dcnv4_kernels.cuh', CSRC / 'dcnv3_sampling.h')
FLAGS = {
    'opt': ['-O2'],
    # float-cast-overflow is not part of -fsanitize=undefined in GCC; it catches a NaN or huge sampling
    # position reaching the float -> int32 conversion of the stencil.
    'sanitized': ['-O1', '-g', '-fno-omit-frame-pointer', '-fsanitize=address,undefined,float-cast-overflow',
                  '-fno-sanitize-recover=all'],
}
COMMON_FLAGS = ['-std=c++17', '-Wall', '-Wextra']
DTYPE_CODES = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
MAGIC = b'DCNV3EM2'
GEOMETRY_FIELDS = ('N', 'H', 'W', 'Ho', 'Wo', 'G', 'C', 'P', 'kh', 'kw', 'sh', 'sw', 'ph', 'pw', 'dh', 'dw',
                   'half_h', 'half_w', 'center', 'mask_logits')
SANITIZER_MARKERS = ('ERROR: AddressSanitizer', 'runtime error:', 'ERROR: LeakSanitizer', 'SUMMARY: ')


class EmulationError(RuntimeError):
    """The emulation binary failed (bad case, crash, or a sanitizer report)."""


class Result(NamedTuple):
    output: torch.Tensor
    grad_input: torch.Tensor
    grad_offset: torch.Tensor
    grad_mask: torch.Tensor


class PackedResult(NamedTuple):
    """DCNv4's results; ``vectorized``: whether the kernels with 16-byte channel accesses ran."""
    output: torch.Tensor
    grad_input: torch.Tensor
    grad_offset_mask: torch.Tensor
    vectorized: bool


def compiler() -> Optional[str]:
    """Path of g++, or None when it is not installed."""
    return shutil.which('g++')


def _out_size(size: int, pad: int, dil: int, k: int, stride: int) -> int:
    return (size + 2 * pad - (dil * (k - 1) + 1)) // stride + 1


def make_geometry(input_shape: Sequence[int], kernel_h: int, kernel_w: int, stride_h: int, stride_w: int,
                  pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int, group_channels: int,
                  offset_scale: float, remove_center: bool, mask_logits: bool) -> dict:
    """The Geometry struct's fields (and offset_scale), computed as ``make_geometry`` in dcnv3_common.h does."""
    n, h, w, channels = input_shape
    if channels != group * group_channels:
        raise ValueError(f'input has {channels} channels but group*group_channels = {group * group_channels}')
    if remove_center and (kernel_h % 2 == 0 or kernel_w % 2 == 0):
        raise ValueError('remove_center needs an odd kernel size')
    g = dict(N=n, H=h, W=w, G=group, C=group_channels, kh=kernel_h, kw=kernel_w, sh=stride_h, sw=stride_w,
             ph=pad_h, pw=pad_w, dh=dilation_h, dw=dilation_w,
             half_h=(dilation_h * (kernel_h - 1)) // 2, half_w=(dilation_w * (kernel_w - 1)) // 2,
             center=(kernel_w // 2) * kernel_h + kernel_h // 2 if remove_center else -1,
             P=kernel_h * kernel_w - int(bool(remove_center)), mask_logits=int(bool(mask_logits)),
             Ho=_out_size(h, pad_h, dilation_h, kernel_h, stride_h),
             Wo=_out_size(w, pad_w, dilation_w, kernel_w, stride_w), offset_scale=float(offset_scale))
    if g['Ho'] <= 0 or g['Wo'] <= 0:
        raise ValueError('output size would be empty')
    if mask_logits and g['P'] > 64:
        raise ValueError('the fused softmax supports at most 64 kernel points')
    return g


def _source_hash(flavour: str, cxx: str, include_dirs: Sequence[str]) -> str:
    h = hashlib.sha256()
    for path in SOURCES:
        h.update(path.read_bytes())
    version = subprocess.run([cxx, '--version'], capture_output=True, text=True, check=True).stdout
    h.update('\0'.join([flavour, *FLAGS[flavour], *COMMON_FLAGS, version, torch.__version__, *include_dirs])
             .encode())
    return h.hexdigest()[:16]


def build(flavours: Sequence[str] = ('opt', 'sanitized'), cache_dir: Optional[os.PathLike] = None) -> Dict[str, Path]:
    """Compiles the missing flavours (in parallel) and returns ``{flavour: binary path}``.

    A binary is reused while the hash of the sources, flags, compiler and torch version is unchanged; it is
    written under a temporary name and renamed, so concurrent builds (pytest-xdist workers) are safe.
    """
    from torch.utils.cpp_extension import include_paths
    cxx = compiler()
    if cxx is None:
        raise EmulationError('g++ not found')
    cache = Path(cache_dir or os.environ.get('DCNV3_CUDA_EMULATION_CACHE') or CSRC.parent / 'build' / 'cuda_emulation')
    cache.mkdir(parents=True, exist_ok=True)
    includes = include_paths()[:1]  # torch/include, for torch/headeronly
    binaries, jobs = {}, []
    for flavour in flavours:
        binary = cache / f'emulate-{flavour}-{_source_hash(flavour, cxx, includes)}'
        binaries[flavour] = binary
        if not binary.exists():
            tmp = cache / f'{binary.name}.{os.getpid()}.tmp'
            cmd = [cxx, *COMMON_FLAGS, *FLAGS[flavour], *(f'-isystem{d}' for d in includes),
                   str(HERE / 'emulate.cpp'), '-o', str(tmp)]
            jobs.append((binary, tmp, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                        text=True)))
    for binary, tmp, proc in jobs:
        log, _ = proc.communicate()
        if proc.returncode != 0:
            raise EmulationError(f'building {binary.name} failed:\n{log}')
        os.replace(tmp, binary)
    return binaries


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


class Emulator:
    """Runs cases through one emulation binary.

    Call it like the op's forward plus backward::

        emu(input, offset, mask, grad_output, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
            dilation_h, dilation_w, group, group_channels, offset_scale, remove_center,
            mask_is_logits=False, blocks=0, threads=0, seed=0)

    ``blocks``/``threads`` (0: the launchers' ``blocks_for(total)`` and ``kThreads``) set the grid of every
    launch; a tiny grid makes the grid-stride loops iterate. ``seed`` seeds the shuffled order in which the
    (block, thread) pairs of each launch run. Any nonzero exit code or sanitizer report raises EmulationError.
    :meth:`packed` runs DCNv4 cases the same way.
    """

    def __init__(self, binary: os.PathLike, timeout: float = 120.0):
        self.binary = Path(binary)
        self.timeout = timeout
        self.env = dict(os.environ)
        self.env.pop('LD_PRELOAD', None)  # ASan must be the first runtime loaded
        self.env['ASAN_OPTIONS'] = 'detect_leaks=0:halt_on_error=1:abort_on_error=0'
        self.env['UBSAN_OPTIONS'] = 'print_stacktrace=1:halt_on_error=1'

    def __call__(self, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, grad_output: torch.Tensor,
                 kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, pad_h: int, pad_w: int,
                 dilation_h: int, dilation_w: int, group: int, group_channels: int, offset_scale: float,
                 remove_center: bool, mask_is_logits: bool = False, *, blocks: int = 0, threads: int = 0,
                 seed: int = 0) -> Result:
        dtype = input.dtype
        if dtype not in DTYPE_CODES:
            raise ValueError(f'unsupported dtype {dtype}')
        g = make_geometry(input.shape, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
                          group, group_channels, offset_scale, remove_center, mask_is_logits)
        pixels = (g['N'], g['Ho'], g['Wo'])
        shapes = dict(output=(*pixels, g['G'] * g['C']), grad_input=tuple(input.shape),
                      grad_offset=(*pixels, g['G'] * g['P'] * 2), grad_mask=(*pixels, g['G'] * g['P']))
        for name, t, shape in (('offset', offset, shapes['grad_offset']), ('mask', mask, shapes['grad_mask']),
                               ('grad_output', grad_output, shapes['output'])):
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f'{name} must be {dtype} of shape {shape}, got {t.dtype} {tuple(t.shape)}')
        return Result(**self._run(dtype, g, blocks, threads, seed, 0, 0, False, (input, offset, mask, grad_output),
                                  shapes))

    def packed(self, input: torch.Tensor, offset_mask: torch.Tensor, grad_output: torch.Tensor, kernel_h: int,
               kernel_w: int, stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int,
               dilation_w: int, group: int, group_channels: int, offset_scale: float, remove_center: bool,
               softmax: bool = False, *, blocks: int = 0, threads: int = 0, seed: int = 0,
               scalar_loads: bool = False) -> PackedResult:
        """Forward and backward of one DCNv4 case (``offset_mask`` packed, padded or not), as the launchers run
        them; ``scalar_loads`` forces the kernels without vector channel accesses."""
        dtype = input.dtype
        if dtype not in DTYPE_CODES:
            raise ValueError(f'unsupported dtype {dtype}')
        g = make_geometry(input.shape, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
                          group, group_channels, offset_scale, remove_center, softmax)
        pixels = (g['N'], g['Ho'], g['Wo'])
        channels = offset_mask.shape[-1]
        used = 3 * g['G'] * g['P']
        if not used <= channels <= (used + 7) // 8 * 8:
            raise ValueError(f'offset_mask needs {used} channels, padded to at most a multiple of 8, got {channels}')
        shapes = dict(output=(*pixels, g['G'] * g['C']), grad_input=tuple(input.shape),
                      grad_offset_mask=(*pixels, channels))
        for name, t, shape in (('offset_mask', offset_mask, shapes['grad_offset_mask']),
                               ('grad_output', grad_output, shapes['output'])):
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f'{name} must be {dtype} of shape {shape}, got {t.dtype} {tuple(t.shape)}')
        out = self._run(dtype, g, blocks, threads, seed, 1, channels, scalar_loads,
                        (input, offset_mask, grad_output), shapes, trailer=8)
        return PackedResult(**out)

    def _run(self, dtype: torch.dtype, g: dict, blocks: int, threads: int, seed: int, op: int, channels: int,
             scalar_loads: bool, arrays: Sequence[torch.Tensor], shapes: Dict[str, tuple], trailer: int = 0) -> dict:
        """Runs one case file through the binary; the result tensors by name (and ``vectorized`` when the
        result ends with the DCNv4 flag, ``trailer`` bytes)."""
        header = MAGIC + struct.pack(
            '=27qd', DTYPE_CODES[dtype], *(g[k] for k in GEOMETRY_FIELDS), blocks, threads, seed, op, channels,
            int(scalar_loads), g['offset_scale'])
        with tempfile.TemporaryDirectory(prefix='dcnv3_emulation_') as tmp:
            case_file, result_file = Path(tmp) / 'case.bin', Path(tmp) / 'result.bin'
            case_file.write_bytes(header + b''.join(_to_bytes(t) for t in arrays))
            proc = subprocess.run([str(self.binary), str(case_file), str(result_file)], capture_output=True,
                                  text=True, env=self.env, timeout=self.timeout)
            if proc.returncode != 0 or any(m in proc.stderr for m in SANITIZER_MARKERS):
                raise EmulationError(f'{self.binary.name} exited with {proc.returncode}:\n{proc.stderr}')
            data = bytearray(result_file.read_bytes())
        itemsize = torch.empty(0, dtype=dtype).element_size()
        expected = sum(itemsize * torch.Size(s).numel() for s in shapes.values()) + trailer
        if len(data) != expected:
            raise EmulationError(f'result has {len(data)} bytes, expected {expected}')
        out, pos = {}, 0
        for name, shape in shapes.items():
            n = torch.Size(shape).numel() * itemsize
            flat = torch.frombuffer(data[pos:pos + n], dtype=dtype) if n else torch.empty(0, dtype=dtype)
            out[name] = flat.reshape(shape)
            pos += n
        if trailer:
            out['vectorized'] = struct.unpack('=q', bytes(data[pos:pos + 8]))[0] == 1
        return out
