// The CUDA kernel bodies of DCNv4 (forward and backward on the packed
// offset_mask). Included by dcnv3_kernel.cu, which launches them, and by the
// host emulation in dcnv3/tools/cuda_emulation (see dcnv3_kernels.cuh).
//
// The sampling rule, stencil and gradients are DCNv3's (dcnv3_sampling.h);
// the offsets and weights are read through the Geometry's addressing, so the
// same bodies would serve DCNv3's layout. What differs from the DCNv3 CUDA
// kernels is the work split, after DCNv4's kernels:
// - Forward: one thread per (output pixel, group, run of kVec channels). The
//   point's offset pair and weight are loaded once into registers and serve
//   all kVec channels, and the four corners (and the output) are read and
//   written with one kVec-wide (16-byte) vector access each where the group
//   width is a multiple of kVec and the tensors are 16-byte aligned
//   (kAligned); otherwise with scalar accesses, the last run of a group
//   masked, so any group width works.
// - Backward: one thread per (output pixel, group), as in DCNv3, reading
//   grad_output and the corners kVec channels at a time the same way;
//   grad_input is accumulated with atomics in the accumulation type.
// Any kernel size works (the point loop is not unrolled for a fixed size).
#pragma once

#include <cstdint>

#include "../dcnv3_sampling.h"
#include "dcnv3_kernels.cuh"  // kThreads, cast_kernel

namespace dcnv3 {

// Channels per vector access: 16 bytes (2 double, 4 float, 8 half/bfloat16).
template <typename scalar_t>
constexpr int vector_channels() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

template <typename scalar_t>
struct alignas(16) ChannelVector {
  scalar_t v[vector_channels<scalar_t>()];
};

// Whether the vector accesses are legal for this call (a host-side choice of
// the launcher): every run of kVec channels starts 16 bytes aligned when the
// group width is a multiple of kVec and the channel tensors' data (input and
// output, or grad_output and input) start 16-byte aligned.
template <typename scalar_t>
inline bool channels_vectorizable(const Geometry& g, const void* a, const void* b) {
  return g.C % vector_channels<scalar_t>() == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 &&
      reinterpret_cast<uintptr_t>(b) % 16 == 0;
}

// The `valid` (<= kVec) channels from p on, as acc_t; the rest 0.
template <typename scalar_t, bool kAligned>
DCNV3_HD void load_channels(const scalar_t* p, int valid, opmath_t<scalar_t>* v) {
  constexpr int kVec = vector_channels<scalar_t>();
  if (kAligned) {
    const ChannelVector<scalar_t> chunk = *reinterpret_cast<const ChannelVector<scalar_t>*>(p);
    DCNV3_UNROLL
    for (int i = 0; i < kVec; ++i) {
      v[i] = static_cast<opmath_t<scalar_t>>(chunk.v[i]);
    }
  } else {
    DCNV3_UNROLL
    for (int i = 0; i < kVec; ++i) {
      v[i] = i < valid ? static_cast<opmath_t<scalar_t>>(p[i]) : opmath_t<scalar_t>(0);
    }
  }
}

template <typename scalar_t, bool kAligned>
__global__ void __launch_bounds__(kThreads) packed_forward_kernel(
    const Geometry g,
    const scalar_t* __restrict__ x,
    const scalar_t* off,  // offsets and weights alias (one offset_mask): no __restrict__
    const scalar_t* mask,
    scalar_t* __restrict__ out,
    const int64_t total) {
  using acc_t = opmath_t<scalar_t>;
  constexpr int kVec = vector_channels<scalar_t>();
  const int64_t runs = (g.C + kVec - 1) / kVec;  // channel runs per group
  const int64_t GC = g.G * g.C;
  const int64_t row = g.W * GC;
  const int32_t H = static_cast<int32_t>(g.H);
  const int32_t W = static_cast<int32_t>(g.W);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += step) {
    const int64_t c0 = (t % runs) * kVec;
    const int64_t pg = t / runs;  // (pos, group) index
    const auto [n, ho, wo, pos, gi] = pixel_group(g, pg);
    const int valid = static_cast<int>(g.C - c0 < kVec ? g.C - c0 : kVec);
    const scalar_t* xg = x + n * g.H * row + gi * g.C + c0;
    const scalar_t* offp = off + pos * g.off_pixel + gi * g.off_group;
    const scalar_t* mp = mask + pos * g.mask_pixel + gi * g.mask_group;
    acc_t mx = acc_t(0), inv = acc_t(1);
    if (g.mask_logits) {
      softmax_stats<acc_t>(mp, g.P, mx, inv);
    }
    acc_t acc[kVec];
    DCNV3_UNROLL
    for (int i = 0; i < kVec; ++i) {
      acc[i] = acc_t(0);
    }
    for (int64_t p = 0; p < g.P; ++p) {
      // The point's offsets and weight, once for all the thread's channels.
      const acc_t off_x = static_cast<acc_t>(offp[2 * p]);
      const acc_t off_y = static_cast<acc_t>(offp[2 * p + 1]);
      acc_t m = static_cast<acc_t>(mp[p]);
      if (g.mask_logits) {
        m = exp_(m - mx) * inv;
      }
      acc_t kx, ky, px, py;
      kernel_grid<acc_t>(g, p, kx, ky);
      sample_position<acc_t>(g, ho, wo, kx, ky, off_x, off_y, px, py);
      const Stencil<acc_t> s = make_stencil<acc_t>(px, py, H, W);
      m = sample_weight(s, m);
      int64_t o[4];
      stencil_offsets(s, row, GC, o);
      acc_t v0[kVec], v1[kVec], v2[kVec], v3[kVec];
      load_channels<scalar_t, kAligned>(xg + o[0], valid, v0);
      load_channels<scalar_t, kAligned>(xg + o[1], valid, v1);
      load_channels<scalar_t, kAligned>(xg + o[2], valid, v2);
      load_channels<scalar_t, kAligned>(xg + o[3], valid, v3);
      DCNV3_UNROLL
      for (int i = 0; i < kVec; ++i) {
        acc[i] += m * (s.w[0] * v0[i] + s.w[1] * v1[i] + s.w[2] * v2[i] + s.w[3] * v3[i]);
      }
    }
    scalar_t* o = out + pos * GC + gi * g.C + c0;
    if (kAligned) {
      ChannelVector<scalar_t> chunk;
      DCNV3_UNROLL
      for (int i = 0; i < kVec; ++i) {
        chunk.v[i] = static_cast<scalar_t>(acc[i]);
      }
      *reinterpret_cast<ChannelVector<scalar_t>*>(o) = chunk;
    } else {
      DCNV3_UNROLL
      for (int i = 0; i < kVec; ++i) {
        if (i < valid) {
          o[i] = static_cast<scalar_t>(acc[i]);
        }
      }
    }
  }
}

template <typename scalar_t, bool kAligned, bool kLogits>
__global__ void __launch_bounds__(kThreads) packed_backward_kernel(
    const Geometry g,
    const scalar_t* __restrict__ grad_out,
    const scalar_t* __restrict__ x,
    const scalar_t* off,  // offsets and weights alias, and so do their gradients
    const scalar_t* mask,
    opmath_t<scalar_t>* __restrict__ gin,
    scalar_t* grad_off,
    scalar_t* grad_mask,
    const int64_t total) {
  using acc_t = opmath_t<scalar_t>;
  constexpr int kVec = vector_channels<scalar_t>();
  const int64_t GC = g.G * g.C;
  const int64_t row = g.W * GC;
  const int32_t H = static_cast<int32_t>(g.H);
  const int32_t W = static_cast<int32_t>(g.W);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t pg = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; pg < total; pg += step) {
    const auto [n, ho, wo, pos, gi] = pixel_group(g, pg);
    const int64_t x_off = n * g.H * row + gi * g.C;
    const scalar_t* xg = x + x_off;
    acc_t* ging = gin + x_off;
    const scalar_t* go = grad_out + pos * GC + gi * g.C;
    const scalar_t* offp = off + pos * g.off_pixel + gi * g.off_group;
    const scalar_t* mp = mask + pos * g.mask_pixel + gi * g.mask_group;
    scalar_t* goffp = grad_off + pos * g.off_pixel + gi * g.off_group;
    scalar_t* gmp = grad_mask + pos * g.mask_pixel + gi * g.mask_group;
    acc_t mx = acc_t(0), inv = acc_t(1);
    // Only used with kLogits (P <= kMaxSoftmaxPoints is checked on the host).
    acc_t prob[kLogits ? kMaxSoftmaxPoints : 1];
    acc_t gm[kLogits ? kMaxSoftmaxPoints : 1];
    if (kLogits) {
      softmax_stats<acc_t>(mp, g.P, mx, inv);
    }
    for (int64_t p = 0; p < g.P; ++p) {
      const acc_t off_x = static_cast<acc_t>(offp[2 * p]);
      const acc_t off_y = static_cast<acc_t>(offp[2 * p + 1]);
      acc_t prob_p = static_cast<acc_t>(mp[p]);
      if (kLogits) {
        prob_p = exp_(prob_p - mx) * inv;
        prob[p] = prob_p;
      }
      acc_t kx, ky, px, py;
      kernel_grid<acc_t>(g, p, kx, ky);
      sample_position<acc_t>(g, ho, wo, kx, ky, off_x, off_y, px, py);
      const Stencil<acc_t> s = make_stencil<acc_t>(px, py, H, W);
      const acc_t m = sample_weight(s, prob_p);
      int64_t o[4];
      stencil_offsets(s, row, GC, o);
      const acc_t mw[4] = {m * s.w[0], m * s.w[1], m * s.w[2], m * s.w[3]};
      // d[k] = sum_c go[c] * corner_k[c] (see dcnv3_kernels.cuh).
      acc_t d[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
      for (int64_t c0 = 0; c0 < g.C; c0 += kVec) {
        const int valid = static_cast<int>(g.C - c0 < kVec ? g.C - c0 : kVec);
        acc_t gc[kVec], v[4][kVec];
        load_channels<scalar_t, kAligned>(go + c0, valid, gc);
        DCNV3_UNROLL
        for (int k = 0; k < 4; ++k) {
          load_channels<scalar_t, kAligned>(xg + o[k] + c0, valid, v[k]);
        }
        DCNV3_UNROLL
        for (int k = 0; k < 4; ++k) {
          DCNV3_UNROLL
          for (int i = 0; i < kVec; ++i) {
            d[k] += gc[i] * v[k][i];
          }
          if (s.w[k] != acc_t(0)) {
            for (int i = 0; i < valid; ++i) {
              atomicAdd(ging + o[k] + c0 + i, mw[k] * gc[i]);
            }
          }
        }
      }
      acc_t s_v, s_x, s_y;
      stencil_value_grad<acc_t>(s, d, s_v, s_x, s_y);
      acc_t gox, goy;
      offset_grad<acc_t>(g, m * s_x, m * s_y, gox, goy);
      goffp[2 * p] = static_cast<scalar_t>(gox);
      goffp[2 * p + 1] = static_cast<scalar_t>(goy);
      if (kLogits) {
        gm[p] = s_v;
      } else {
        gmp[p] = static_cast<scalar_t>(s_v);
      }
    }
    if (kLogits) {
      softmax_backward_inplace(prob, gm, g.P);
      for (int64_t p = 0; p < g.P; ++p) {
        gmp[p] = static_cast<scalar_t>(gm[p]);
      }
    }
  }
}

}  // namespace dcnv3
