// The CUDA kernel bodies of DCNv3 (forward, backward, and the cast of the
// float grad_input buffer for half types). Included by dcnv3_kernel.cu, which
// launches them, and by the host emulation in dcnv3/tools/cuda_emulation,
// which compiles these exact bodies as host C++ with a small CUDA shim and
// runs every block and thread of a launch in shuffled order (legal: the
// kernels have no __syncthreads and communicate only through atomicAdd).
//
// Forward: one thread per (output pixel, group, channel), so neighbouring
// threads read neighbouring channels (coalesced NHWC loads).
// Backward: one thread per (output pixel, group), looping over points and
// channels; grad_input is accumulated with atomics in the accumulation type
// (float for half/bfloat16/float, double for double).
//
// Needs Geometry and the per-sample math (dcnv3_sampling.h) and, before this
// header, the scalar types (c10::Half, c10::BFloat16) and atomicAdd.
#pragma once

#include <cstdint>

#include "../dcnv3_sampling.h"

namespace dcnv3 {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) forward_kernel(
    const Geometry g,
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ off,
    const scalar_t* __restrict__ mask,
    scalar_t* __restrict__ out,
    const int64_t total) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t GC = g.G * g.C;
  const int64_t row = g.W * GC;
  const int32_t H = static_cast<int32_t>(g.H);
  const int32_t W = static_cast<int32_t>(g.W);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += step) {
    const int64_t c = t % g.C;
    const int64_t pg = t / g.C;  // (pos, group) index
    const auto [n, ho, wo, pos, gi] = pixel_group(g, pg);
    const scalar_t* xg = x + n * g.H * row + gi * g.C + c;
    const scalar_t* offp = off + pg * g.P * 2;
    const scalar_t* mp = mask + pg * g.P;
    acc_t mx = acc_t(0), inv = acc_t(1);
    if (g.mask_logits) {
      softmax_stats<acc_t>(mp, g.P, mx, inv);
    }
    acc_t acc = acc_t(0);
    for (int64_t p = 0; p < g.P; ++p) {
      acc_t kx, ky, px, py;
      kernel_grid<acc_t>(g, p, kx, ky);
      sample_position<acc_t>(
          g, ho, wo, kx, ky, static_cast<acc_t>(offp[2 * p]), static_cast<acc_t>(offp[2 * p + 1]), px, py);
      const Stencil<acc_t> s = make_stencil<acc_t>(px, py, H, W);
      int64_t o[4];
      stencil_offsets(s, row, GC, o);
      acc_t m = static_cast<acc_t>(mp[p]);
      if (g.mask_logits) {
        m = exp_(m - mx) * inv;
      }
      acc += sample_weight(s, m) *
          (s.w[0] * static_cast<acc_t>(xg[o[0]]) + s.w[1] * static_cast<acc_t>(xg[o[1]]) +
           s.w[2] * static_cast<acc_t>(xg[o[2]]) + s.w[3] * static_cast<acc_t>(xg[o[3]]));
    }
    out[t] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, bool kLogits>
__global__ void __launch_bounds__(kThreads) backward_kernel(
    const Geometry g,
    const scalar_t* __restrict__ grad_out,
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ off,
    const scalar_t* __restrict__ mask,
    opmath_t<scalar_t>* __restrict__ gin,
    scalar_t* __restrict__ grad_off,
    scalar_t* __restrict__ grad_mask,
    const int64_t total) {
  using acc_t = opmath_t<scalar_t>;
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
    const scalar_t* offp = off + pg * g.P * 2;
    const scalar_t* mp = mask + pg * g.P;
    acc_t mx = acc_t(0), inv = acc_t(1);
    // Only used with kLogits (P <= kMaxSoftmaxPoints is checked on the host).
    acc_t prob[kLogits ? kMaxSoftmaxPoints : 1];
    acc_t gm[kLogits ? kMaxSoftmaxPoints : 1];
    if (kLogits) {
      softmax_stats<acc_t>(mp, g.P, mx, inv);
    }
    for (int64_t p = 0; p < g.P; ++p) {
      acc_t prob_p = static_cast<acc_t>(mp[p]);
      if (kLogits) {
        prob_p = exp_(prob_p - mx) * inv;
        prob[p] = prob_p;
      }
      acc_t kx, ky, px, py;
      kernel_grid<acc_t>(g, p, kx, ky);
      sample_position<acc_t>(
          g, ho, wo, kx, ky, static_cast<acc_t>(offp[2 * p]), static_cast<acc_t>(offp[2 * p + 1]), px, py);
      const Stencil<acc_t> s = make_stencil<acc_t>(px, py, H, W);
      const acc_t m = sample_weight(s, prob_p);
      int64_t o[4];
      stencil_offsets(s, row, GC, o);
      // d[k] = sum_c go[c] * corner_k[c]; the sampled value is linear in the
      // corner values, so the stencil applied to d gives sum_c go*value and
      // the position derivatives (same arithmetic as the CPU kernel).
      acc_t d[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
      for (int64_t c = 0; c < g.C; ++c) {
        const acc_t gc = static_cast<acc_t>(go[c]);
        for (int k = 0; k < 4; ++k) {
          d[k] += gc * static_cast<acc_t>(xg[o[k] + c]);
          if (s.w[k] != acc_t(0)) {
            atomicAdd(ging + o[k] + c, m * s.w[k] * gc);
          }
        }
      }
      acc_t s_v, s_x, s_y;
      stencil_value_grad<acc_t>(s, d, s_v, s_x, s_y);
      acc_t gox, goy;
      offset_grad<acc_t>(g, m * s_x, m * s_y, gox, goy);
      grad_off[pg * g.P * 2 + 2 * p] = static_cast<scalar_t>(gox);
      grad_off[pg * g.P * 2 + 2 * p + 1] = static_cast<scalar_t>(goy);
      if (kLogits) {
        gm[p] = s_v;
      } else {
        grad_mask[pg * g.P + p] = static_cast<scalar_t>(s_v);
      }
    }
    if (kLogits) {
      softmax_backward_inplace(prob, gm, g.P);
      for (int64_t p = 0; p < g.P; ++p) {
        grad_mask[pg * g.P + p] = static_cast<scalar_t>(gm[p]);
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) cast_kernel(const acc_t* __restrict__ src, scalar_t* __restrict__ dst, const int64_t total) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    dst[i] = static_cast<scalar_t>(src[i]);
  }
}

}  // namespace dcnv3
