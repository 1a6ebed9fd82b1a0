"""Micro-benchmark of the compiled DCNv3 op against pure-PyTorch versions (CPU by default).

    python dcnv3/tools/bench_op.py [--device cuda] [--dtype float32] [--threads N]

Baselines: a grid_sample formulation in the style of the official pure-PyTorch
fallback (written here from the math: one padded NCHW copy per group, one
grid_sample over all points), and timm_internimage.ops.dcnv3_torch when importable.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import timm_internimage_dcnv3 as ext


def grid_sample_dcnv3(x, offset, mask, kh, kw, sh, sw, ph, pw, dh, dw, group, gc, scale, remove_center):
    """DCNv3 via grid_sample (align_corners=False, zero padding), official-fallback style."""
    n, h, w, _ = x.shape
    ho = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    wo = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    half_w, half_h = (dw * (kw - 1)) // 2, (dh * (kh - 1)) // 2
    pts = [(i, j) for i in range(kw) for j in range(kh)]
    if remove_center:
        pts.remove((kw // 2, kh // 2))
    p = len(pts)
    dt, dev = x.dtype, x.device
    ki = torch.tensor([q[0] for q in pts], dtype=dt, device=dev)
    kj = torch.tensor([q[1] for q in pts], dtype=dt, device=dev)
    xo = torch.arange(wo, dtype=dt, device=dev).view(1, wo, 1, 1)
    yo = torch.arange(ho, dtype=dt, device=dev).view(ho, 1, 1, 1)
    off = offset.view(n, ho, wo, group, p, 2)
    px = xo * sw - pw + half_w + (ki * dw - half_w + off[..., 0]) * scale
    py = yo * sh - ph + half_h + (kj * dh - half_h + off[..., 1]) * scale
    # pixel -> normalised coords for align_corners=False
    grid = torch.stack(((px + 0.5) * (2.0 / w) - 1, (py + 0.5) * (2.0 / h) - 1), -1)  # n,ho,wo,g,p,2
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(n * group, ho * wo, p, 2)
    inp = x.view(n, h * w, group, gc).permute(0, 2, 3, 1).reshape(n * group, gc, h, w)
    sampled = F.grid_sample(inp, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # ng,gc,howo,p
    m = mask.view(n, ho * wo, group, p).permute(0, 2, 1, 3).reshape(n * group, 1, ho * wo, p)
    out = (sampled * m).sum(-1).view(n, group * gc, ho * wo)
    return out.transpose(1, 2).reshape(n, ho, wo, group * gc).contiguous()


CLOCK = time.perf_counter


def bench(fn, args, backward, reps):
    inputs = [a.detach().clone().requires_grad_(backward) if torch.is_tensor(a) else a for a in args]
    def once():
        y = fn(*inputs)
        if backward:
            y.backward(gout)
    y = fn(*inputs)
    gout = torch.randn_like(y)
    for _ in range(2):
        once()
    best = float("inf")
    for _ in range(reps):  # min over repetitions: robust on a shared machine
        if y.is_cuda:
            torch.cuda.synchronize()
        t = CLOCK()
        once()
        if y.is_cuda:
            torch.cuda.synchronize()
        best = min(best, CLOCK() - t)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the CPU time of the calling thread (with --threads 1: robust on a loaded machine)",
    )
    a = ap.parse_args()
    if a.cpu_time:
        global CLOCK
        CLOCK = time.thread_time
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    impls = {"compiled": ext.dcnv3, "grid_sample": grid_sample_dcnv3}
    try:
        from timm_internimage.ops.dcnv3_torch import dcnv3_torch

        impls["dcnv3_torch"] = dcnv3_torch
    except ImportError:
        pass
    configs = [(8, 56, 56, 64, 4), (8, 28, 28, 128, 8), (8, 14, 14, 256, 16), (8, 7, 7, 512, 32)]
    print(f"device={a.device} dtype={a.dtype} threads={torch.get_num_threads()} (ms per call, fwd / fwd+bwd)")
    for n, h, w, c, g in configs:
        x = torch.randn(n, h, w, c, device=a.device, dtype=dtype)
        off = torch.randn(n, h, w, g * 18, device=a.device, dtype=dtype) * 2
        mask = torch.softmax(torch.randn(n, h, w, g, 9, device=a.device, dtype=dtype), -1).view(n, h, w, -1)
        args = (x, off, mask, 3, 3, 1, 1, 1, 1, 1, 1, g, c // g, 1.0, False)
        row = []
        for name, fn in impls.items():
            with torch.no_grad():
                f = bench(fn, args, False, a.reps)
            fb = bench(fn, args, True, a.reps)
            row.append(f"{name} {f:7.2f} / {fb:7.2f}")
        print(f"N={n} {h}x{w} C={c} G={g}: " + " | ".join(row))


if __name__ == "__main__":
    main()
