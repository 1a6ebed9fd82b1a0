"""Tests of the compiled DCNv3 operator (the ``timm-internimage-dcnv3`` wheel).

Skipped only when that wheel is not installed; CI installs it, so there they
must pass. CUDA tests run wherever a GPU is present.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("timm_internimage_dcnv3") is None:
    pytest.skip(
        "compiled DCNv3 op not installed (build it: bash dcnv3/build_wheel.sh --cpu --install)",
        allow_module_level=True,
    )

import timm_internimage_dcnv3 as ext  # noqa: E402  (a broken install must fail, not skip)

GOLDEN = Path(__file__).parent / "data" / "golden"
ARG_NAMES = (
    "kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w",
    "dilation_h", "dilation_w", "group", "group_channels", "offset_scale", "remove_center",
)
CUDA = pytest.mark.skipif(
    not (torch.cuda.is_available() and ext.cuda_loaded()), reason="needs a CUDA GPU and a CUDA build of the op"
)


# --------------------------------------------------------------------------- reference
def reference_dcnv3(x, offset, mask, kh, kw, sh, sw, ph, pw, dh, dw, group, gc, scale, remove_center):
    """Independent gather-based DCNv3 in the official CUDA kernel's semantics (differentiable through autograd)."""
    n, h, w, _ = x.shape
    ho = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    wo = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    half_w, half_h = (dw * (kw - 1)) // 2, (dh * (kh - 1)) // 2
    points = [(i, j) for i in range(kw) for j in range(kh)]
    if remove_center:
        points.remove((kw // 2, kh // 2))
    p = len(points)
    dt, dev = x.dtype, x.device
    off = offset.reshape(n, ho, wo, group, p, 2)
    m = mask.reshape(n, ho, wo, group, p)
    xg = x.reshape(n, h * w, group, gc)
    yo = torch.arange(ho, dtype=dt, device=dev).view(ho, 1, 1, 1)
    xo = torch.arange(wo, dtype=dt, device=dev).view(1, wo, 1, 1)
    ki = torch.tensor([q[0] for q in points], dtype=dt, device=dev)
    kj = torch.tensor([q[1] for q in points], dtype=dt, device=dev)
    px = xo * sw - pw + half_w + (ki * dw - half_w + off[..., 0]) * scale
    py = yo * sh - ph + half_h + (kj * dh - half_h + off[..., 1]) * scale
    # The official CUDA kernel's rule: a sample counts only if -1 < position < size on both axes.
    counts = (px > -1) & (px < w) & (py > -1) & (py < h)
    px, py = torch.where(counts, px, -2.0), torch.where(counts, py, -2.0)
    m = torch.where(counts, m, 0.0)
    x0, y0 = torch.floor(px), torch.floor(py)
    fx, fy = px - x0, py - y0
    out = x.new_zeros(n, ho, wo, group, gc)
    gidx = torch.arange(group, device=dev).view(1, 1, 1, group, 1)
    nidx = torch.arange(n, device=dev).view(n, 1, 1, 1, 1)
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        xi, yi = x0 + dx, y0 + dy
        wgt = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
        valid = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
        idx = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long()
        val = xg[nidx, idx, gidx]  # (n, ho, wo, group, p, gc)
        out = out + (val * (wgt * valid * m).unsqueeze(-1)).sum(-2)
    return out.reshape(n, ho, wo, group * gc)


def random_case(n, h, w, group, gc, kh=3, kw=3, stride=1, pad=1, dil=1, scale=1.0, remove_center=False,
                dtype=torch.float64, device="cpu", seed=0, offset_std=2.0):
    g = torch.Generator().manual_seed(seed)
    ho = (h + 2 * pad - (dil * (kh - 1) + 1)) // stride + 1
    wo = (w + 2 * pad - (dil * (kw - 1) + 1)) // stride + 1
    p = kh * kw - int(remove_center)
    x = torch.randn(n, h, w, group * gc, generator=g, dtype=torch.float64)
    off = torch.randn(n, ho, wo, group * p * 2, generator=g, dtype=torch.float64) * offset_std
    mask = torch.softmax(torch.randn(n, ho, wo, group, p, generator=g, dtype=torch.float64), -1).reshape(n, ho, wo, -1)
    args = (kh, kw, stride, stride, pad, pad, dil, dil, group, gc, scale, remove_center)
    conv = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return conv(x), conv(off), conv(mask), args


def _leaf(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def _run(fn, x, off, mask, args, grad_out, **kw):
    x, off, mask = _leaf(x, off, mask)
    y = fn(x, off, mask, *args, **kw)
    y.backward(grad_out)
    return y.detach(), x.grad, off.grad, mask.grad


# --------------------------------------------------------------------------- basics
def test_version_and_supports():
    assert ext.__version__ == "0.1.0"
    for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        assert ext.supports(torch.device("cpu"), dt)
    assert not ext.supports(torch.device("cpu"), torch.int64)
    assert ext.supports(torch.device("cuda"), torch.float32) == (ext.cuda_loaded() and torch.cuda.is_available())
    assert hasattr(torch.ops.timm_internimage, "dcnv3_forward")
    assert hasattr(torch.ops.timm_internimage, "dcnv3_backward")


# --------------------------------------------------------------------------- golden
def _golden_cases():
    spec = GOLDEN / "dcnv3_op_cases.json"
    if not spec.exists():
        return []
    return json.loads(spec.read_text())


@pytest.mark.parametrize("case", _golden_cases(), ids=lambda c: c["file"])
def test_golden_float64(case):
    from safetensors.torch import load_file

    data = load_file(str(GOLDEN / case["file"]))
    args = tuple(case[k] for k in ARG_NAMES)
    y, gx, goff, gm = _run(ext.dcnv3, data["input"], data["offset"], data["mask"], args, data["grad_output"])
    tol = dict(rtol=0, atol=1e-10)
    torch.testing.assert_close(y, data["output"], **tol)
    torch.testing.assert_close(gx, data["grad_input"], **tol)
    torch.testing.assert_close(goff, data["grad_offset"], **tol)
    torch.testing.assert_close(gm, data["grad_mask"], **tol)


def test_golden_cases_present():
    assert len(_golden_cases()) >= 8, "op golden files missing from tests/data/golden"


# --------------------------------------------------------------------------- gradcheck
GRADCHECK_CASES = [
    dict(n=2, h=5, w=6, group=2, gc=3),
    dict(n=1, h=6, w=5, group=1, gc=2, stride=2, pad=1),
    dict(n=1, h=5, w=5, group=3, gc=2, dil=2, pad=2, scale=2.0),
    dict(n=2, h=4, w=5, group=2, gc=2, remove_center=True),
    dict(n=1, h=6, w=6, group=1, gc=2, kh=5, kw=3, pad=2, offset_std=4.0),
]


@pytest.mark.parametrize("cfg", GRADCHECK_CASES, ids=str)
def test_gradcheck(cfg):
    x, off, mask, args = random_case(**cfg, seed=1)
    inputs = tuple(_leaf(x, off, mask))
    assert torch.autograd.gradcheck(lambda a, b, c: ext.dcnv3(a, b, c, *args), inputs, eps=1e-6, atol=1e-6)


def test_gradcheck_mask_logits():
    x, off, _, args = random_case(n=2, h=4, w=5, group=2, gc=2, seed=2)
    logits = torch.randn(2, 4, 5, 2 * 9, dtype=torch.float64)
    inputs = tuple(_leaf(x, off, logits))
    assert torch.autograd.gradcheck(
        lambda a, b, c: ext.dcnv3(a, b, c, *args, mask_is_logits=True), inputs, eps=1e-6, atol=1e-6
    )


def test_mask_logits_matches_softmax_then_op():
    x, off, _, args = random_case(n=2, h=7, w=6, group=4, gc=4, seed=3)
    group, p = 4, 9
    logits = torch.randn(2, 7, 6, group * p, dtype=torch.float64) * 3
    gout = torch.randn(2, 7, 6, group * 4, dtype=torch.float64)
    fused = _run(ext.dcnv3, x, off, logits, args, gout, mask_is_logits=True)

    def unfused(a, b, c, *rest):
        c = torch.softmax(c.reshape(*c.shape[:3], group, p), -1).reshape(c.shape)
        return ext.dcnv3(a, b, c, *rest)

    expected = _run(unfused, x, off, logits, args, gout)
    for got, exp in zip(fused, expected):
        torch.testing.assert_close(got, exp, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- dtypes vs reference
DTYPE_TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=2e-2, atol=2e-2),
    torch.bfloat16: dict(rtol=8e-2, atol=8e-2),
}
RANDOM_CASES = [
    dict(n=2, h=9, w=7, group=4, gc=8),
    # 16 and 32 channels per group (every InternImage variant) run kernels compiled for that width.
    dict(n=2, h=6, w=7, group=2, gc=16),
    dict(n=1, h=5, w=6, group=3, gc=32, remove_center=True, scale=0.5),
    dict(n=1, h=10, w=11, group=2, gc=16, stride=2, pad=1, remove_center=True),
    dict(n=3, h=6, w=8, group=3, gc=5, kh=5, kw=5, pad=2, scale=2.0),
]


def _reference_in_float64(x, off, mask, args, gout):
    return _run(reference_dcnv3, x.double(), off.double(), mask.double(), args, gout.double())


@pytest.mark.parametrize("dtype", list(DTYPE_TOL), ids=str)
@pytest.mark.parametrize("cfg", RANDOM_CASES, ids=str)
def test_matches_reference(cfg, dtype):
    x, off, mask, args = random_case(**cfg, dtype=dtype, seed=4)
    gout = torch.randn(*ext.dcnv3(x, off, mask, *args).shape, dtype=torch.float64).to(dtype)
    got = _run(ext.dcnv3, x, off, mask, args, gout)
    exp = _reference_in_float64(x, off, mask, args, gout)
    # Offsets are perturbed on purpose so samples sit off the bilinear kinks in
    # low precision the same way in both implementations.
    tol = DTYPE_TOL[dtype]
    names = ("output", "grad_input", "grad_offset", "grad_mask")
    for name, a, b in zip(names, got, exp):
        assert a.dtype == dtype
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double() / scale, b / scale, **tol, msg=lambda m: f"{name}: {m}")


def test_matches_pure_pytorch_op():
    torch_ops = pytest.importorskip("timm_internimage.ops.dcnv3_torch", reason="pure-PyTorch op not available")
    for seed, cfg in enumerate(RANDOM_CASES):
        x, off, mask, args = random_case(**cfg, seed=10 + seed)
        gout = torch.randn(*ext.dcnv3(x, off, mask, *args).shape, dtype=torch.float64)
        got = _run(ext.dcnv3, x, off, mask, args, gout)
        exp = _run(torch_ops.dcnv3_torch, x, off, mask, args, gout)
        for a, b in zip(got, exp):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- batch sizes / paths
@pytest.mark.parametrize("n", [1, 3, 300])
def test_batch_sizes(n):
    x, off, mask, args = random_case(n=n, h=4, w=5, group=2, gc=3, seed=5)
    gout = torch.randn(n, 4, 5, 6, dtype=torch.float64)
    got = _run(ext.dcnv3, x, off, mask, args, gout)
    exp = _run(reference_dcnv3, x, off, mask, args, gout)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_backward_partitions(threads):
    """Both grad_input strategies: per (batch, group) slices and private buffers."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for cfg in (dict(n=1, h=16, w=16, group=1, gc=8), dict(n=3, h=8, w=9, group=2, gc=4)):
            x, off, mask, args = random_case(**cfg, seed=6)
            gout = torch.randn(*ext.dcnv3(x, off, mask, *args).shape, dtype=torch.float64)
            got = _run(ext.dcnv3, x, off, mask, args, gout)
            exp = _run(reference_dcnv3, x, off, mask, args, gout)
            for a, b in zip(got, exp):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    finally:
        torch.set_num_threads(old)


_ISA_DTYPES = (torch.float64, torch.float32, torch.bfloat16)
_ISA_WIDTHS = (12, 16, 32)  # run-time width, and the two widths compiled as constants
_ISA_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[2])
import test_compiled_op as t
res = []
for gc in t._ISA_WIDTHS:
    for dtype in t._ISA_DTYPES:
        res.append(t._run(t.ext.dcnv3, *t._isa_case(gc, dtype)))
torch.save(res, sys.argv[1])
"""


def _isa_case(gc, dtype):
    x, off, mask, args = random_case(n=2, h=7, w=9, group=2, gc=gc, dtype=dtype, seed=21)
    gout = torch.randn(2, 7, 9, 2 * gc, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    return x, off, mask, args, gout


@pytest.mark.parametrize("isa", ["baseline", "avx2", "auto"])
def test_cpu_isa_variants(isa, tmp_path):
    """Every CPU loop variant chosen at run time (baseline ISA, AVX2, and the best this CPU has, e.g.
    AVX-512) matches the reference, for run-time and compiled-in group widths."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TIMM_INTERNIMAGE_DCNV3_CPU_ISA=isa)
    out = tmp_path / "res.pt"
    subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(out), str(Path(__file__).parent)], env=env, check=True)
    results = iter(torch.load(out))
    for gc in _ISA_WIDTHS:
        for dtype in _ISA_DTYPES:
            x, off, mask, args, gout = _isa_case(gc, dtype)
            exp = _reference_in_float64(x, off, mask, args, gout)
            for a, b in zip(next(results), exp):
                scale = max(1.0, b.abs().max().item())
                torch.testing.assert_close(a.double() / scale, b / scale, **DTYPE_TOL[dtype])


@pytest.mark.parametrize("gc", [8, 16])
def test_fused_softmax_float32(gc):
    """The in-kernel softmax of float32 logits (its own vectorised exp) is accurate to float32 rounding."""
    x, off, _, args = random_case(n=2, h=6, w=5, group=3, gc=gc, seed=22)
    logits = torch.randn(2, 6, 5, 3 * 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 4
    got = ext.dcnv3(x.float(), off.float(), logits.float(), *args, mask_is_logits=True)
    prob = torch.softmax(logits.float().double().reshape(2, 6, 5, 3, 9), -1).reshape(logits.shape)
    exp = reference_dcnv3(x.float().double(), off.float().double(), prob, *args)
    torch.testing.assert_close(got.double(), exp, rtol=2e-6, atol=2e-6)


def test_nan_logits_propagate():
    """A NaN logit makes that group's output NaN (as a softmax would), and nothing else."""
    x, off, _, args = random_case(n=1, h=4, w=4, group=2, gc=16, dtype=torch.float32, seed=23)
    logits = torch.zeros(1, 4, 4, 2 * 9)
    logits[0, 1, 2, 3] = float("nan")
    y = ext.dcnv3(x, off, logits, *args, mask_is_logits=True)
    assert torch.isnan(y[0, 1, 2, :16]).all()
    nan = torch.isnan(y)
    nan[0, 1, 2, :16] = False
    assert not nan.any()


def test_non_contiguous_inputs():
    x, off, mask, args = random_case(n=2, h=6, w=7, group=2, gc=4, seed=7)
    xt = x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    assert not xt.is_contiguous()
    torch.testing.assert_close(ext.dcnv3(xt, off, mask, *args), ext.dcnv3(x, off, mask, *args), rtol=0, atol=0)


@pytest.mark.parametrize("far", [1e30, -1e30])
@pytest.mark.parametrize("gc", [4, 16])
def test_far_out_of_bounds_positions(far, gc):
    """Positions far outside the image (beyond int32) sample zeros: clamped in floating point, never wrapped."""
    x, off, mask, args = random_case(n=1, h=5, w=5, group=1, gc=gc, seed=8, dtype=torch.float32)
    off = torch.full_like(off, far)
    y = ext.dcnv3(x, off, mask, *args)
    assert torch.equal(y, torch.zeros_like(y))


def test_bad_arguments_raise():
    x, off, mask, args = random_case(n=1, h=5, w=5, group=2, gc=4, seed=9)
    with pytest.raises(RuntimeError, match="group_channels"):
        ext.dcnv3(x, off, mask, *args[:8], 2, 3, *args[10:])
    with pytest.raises(RuntimeError, match="offset"):
        ext.dcnv3(x, off[..., :-2], mask, *args)
    with pytest.raises(RuntimeError, match="dtype"):
        ext.dcnv3(x, off.float(), mask, *args)


# --------------------------------------------------------------------------- torch.library integration
def test_opcheck():
    x, off, mask, args = random_case(n=2, h=5, w=6, group=2, gc=3, seed=11)
    for op in (torch.ops.timm_internimage.dcnv3_forward.default, torch.ops.timm_internimage.dcnv3_softmax_forward.default):
        torch.library.opcheck(op, (*_leaf(x, off, mask), *args))
    gout = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    torch.library.opcheck(torch.ops.timm_internimage.dcnv3_backward.default, (gout, x, off, mask, *args))


def test_torch_compile_fullgraph():
    x, off, mask, args = random_case(n=2, h=6, w=5, group=2, gc=4, dtype=torch.float32, seed=12)

    def f(a, b, c):
        return (ext.dcnv3(a * 2, b, c, *args) + 1).square().sum()

    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    xa, oa, ma = _leaf(x, off, mask)
    xb, ob, mb = _leaf(x, off, mask)
    f(xa, oa, ma).backward()
    compiled(xb, ob, mb).backward()
    for a, b in ((xa, xb), (oa, ob), (ma, mb)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)


def test_torch_export():
    x, off, mask, args = random_case(n=2, h=6, w=5, group=2, gc=4, dtype=torch.float32, seed=13)

    class M(torch.nn.Module):
        def forward(self, a, b, c):
            return ext.dcnv3(a, b, c, *args)

    ep = torch.export.export(M(), (x, off, mask))
    assert any("dcnv3_forward" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x, off, mask), M()(x, off, mask), rtol=0, atol=0)


# --------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_loaded():
    if not ext.built_with_cuda():
        pytest.skip("CPU-only build of the op")
    assert ext.cuda_loaded(), f"GPU present but the op's CUDA kernels did not load: {ext.cuda_load_error()}"


@CUDA
@pytest.mark.parametrize("case", _golden_cases(), ids=lambda c: c["file"])
def test_cuda_golden_float64(case):
    from safetensors.torch import load_file

    data = {k: v.cuda() for k, v in load_file(str(GOLDEN / case["file"])).items()}
    args = tuple(case[k] for k in ARG_NAMES)
    got = _run(ext.dcnv3, data["input"], data["offset"], data["mask"], args, data["grad_output"])
    for name, a in zip(("output", "grad_input", "grad_offset", "grad_mask"), got):
        torch.testing.assert_close(a, data[name], rtol=0, atol=1e-10)


@CUDA
@pytest.mark.parametrize("mask_is_logits", [False, True])
@pytest.mark.parametrize("dtype", list(DTYPE_TOL), ids=str)
@pytest.mark.parametrize("cfg", RANDOM_CASES, ids=str)
def test_cuda_matches_cpu(cfg, dtype, mask_is_logits):
    x, off, mask, args = random_case(**cfg, dtype=dtype, seed=14)
    gout = torch.randn(*ext.dcnv3(x, off, mask, *args).shape).to(dtype)
    cpu = _run(ext.dcnv3, x, off, mask, args, gout, mask_is_logits=mask_is_logits)
    gpu = _run(ext.dcnv3, x.cuda(), off.cuda(), mask.cuda(), args, gout.cuda(), mask_is_logits=mask_is_logits)
    for a, b in zip(gpu, cpu):
        assert a.is_cuda and a.dtype == dtype
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.cpu().double() / scale, b.double() / scale, **DTYPE_TOL[dtype])


@CUDA
def test_cuda_gradcheck_and_large_batch():
    x, off, mask, args = random_case(n=2, h=5, w=6, group=2, gc=3, device="cuda", seed=15)
    assert torch.autograd.gradcheck(
        lambda a, b, c: ext.dcnv3(a, b, c, *args), tuple(_leaf(x, off, mask)), eps=1e-6, atol=1e-6
    )
    x, off, mask, args = random_case(n=300, h=4, w=5, group=2, gc=3, device="cuda", seed=16)
    torch.testing.assert_close(ext.dcnv3(x, off, mask, *args).cpu(), ext.dcnv3(x.cpu(), off.cpu(), mask.cpu(), *args))


@CUDA
def test_cuda_compile_and_opcheck():
    x, off, mask, args = random_case(n=2, h=5, w=6, group=2, gc=3, dtype=torch.float32, device="cuda", seed=17)
    torch.library.opcheck(torch.ops.timm_internimage.dcnv3_forward.default, (*_leaf(x, off, mask), *args))
    compiled = torch.compile(lambda a, b, c: ext.dcnv3(a, b, c, *args), fullgraph=True)
    torch.testing.assert_close(compiled(x, off, mask), ext.dcnv3(x, off, mask, *args))
