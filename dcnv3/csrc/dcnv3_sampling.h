// Per-sample DCNv3 math shared by the CPU and CUDA kernels.
//
// Everything here is header-only, free of torch includes, and compiled both by
// the host compiler (CPU kernels) and by nvcc (CUDA kernels), so the CPU tests
// exercise exactly the arithmetic the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DCNV3_HD __host__ __device__ __forceinline__
#define DCNV3_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
// always_inline: the CPU kernels inline these into ISA-specific loops.
#define DCNV3_HD inline __attribute__((always_inline))
#define DCNV3_UNROLL
#else
#define DCNV3_HD inline
#define DCNV3_UNROLL
#endif

namespace dcnv3 {

template <typename T>
DCNV3_HD T floor_(T x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return floor(x);
#else
  return std::floor(x);
#endif
}

template <typename T>
DCNV3_HD T exp_(T x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return exp(x);
#else
  return std::exp(x);
#endif
}

// Largest number of kernel points supported by the fused-softmax variant,
// which keeps one value per point in registers / on the stack.
constexpr int kMaxSoftmaxPoints = 64;

// Shape and hyper-parameters of one op call. All sizes are 64-bit so that
// flat indices computed from them never overflow.
struct Geometry {
  int64_t N, H, W, Ho, Wo;
  int64_t G, C;  // groups, channels per group
  int64_t P;     // kernel points per group (kh*kw - remove_center)
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t half_h, half_w;  // (dil*(k-1))/2
  int64_t center;          // flat index of the centre point, or -1
  double offset_scale;
  bool mask_logits;  // mask holds logits: softmax over P inside the op

  DCNV3_HD int64_t in_channels() const { return G * C; }
  DCNV3_HD int64_t positions() const { return N * Ho * Wo; }
};

// Maps the point index p (0..P-1) to its kernel column i (over kw, slowest)
// and row j (over kh), skipping the centre when remove_center is set.
// 32-bit arithmetic: kernels are small, and 64-bit division is slow.
DCNV3_HD void kernel_point(const Geometry& g, int64_t p, int64_t& i, int64_t& j) {
  const int32_t pp = static_cast<int32_t>(p);
  const int32_t q = (g.center >= 0 && pp >= static_cast<int32_t>(g.center)) ? pp + 1 : pp;
  const int32_t kh = static_cast<int32_t>(g.kh);
  i = q / kh;
  j = q - static_cast<int32_t>(i) * kh;
}

// Base-grid displacement of point p from the window centre: (kx, ky).
template <typename acc_t>
DCNV3_HD void kernel_grid(const Geometry& g, int64_t p, acc_t& kx, acc_t& ky) {
  int64_t i, j;
  kernel_point(g, p, i, j);
  kx = static_cast<acc_t>(i * g.dw - g.half_w);
  ky = static_cast<acc_t>(j * g.dh - g.half_h);
}

// Sampling position, in unpadded input pixel coordinates, of the point with
// base-grid displacement (kx, ky) of output pixel (ho, wo). offset_scale
// multiplies the base grid as well as the learned offset.
template <typename acc_t>
DCNV3_HD void sample_position(
    const Geometry& g,
    int64_t ho,
    int64_t wo,
    acc_t kx,
    acc_t ky,
    acc_t off_x,
    acc_t off_y,
    acc_t& px,
    acc_t& py) {
  const acc_t scale = static_cast<acc_t>(g.offset_scale);
  px = static_cast<acc_t>(wo * g.sw - g.pw + g.half_w) + (kx + off_x) * scale;
  py = static_cast<acc_t>(ho * g.sh - g.ph + g.half_h) + (ky + off_y) * scale;
}

// Bilinear stencil of one sampling position. Corners are ordered
// (y0,x0), (y0,x1), (y1,x0), (y1,x1). Corners outside the image have zero
// weight and element offset 0, so reads through them stay in bounds and
// contribute nothing (zero padding).
template <typename acc_t>
struct Bilinear {
  int64_t off[4];  // element offset of the corner pixel (channel 0 of group)
  acc_t w[4];      // interpolation weight
  acc_t wx[4];     // d w / d px
  acc_t wy[4];     // d w / d py
  acc_t fx, fy;    // fractional position inside the cell
  bool any;        // at least one corner inside the image
};

template <typename acc_t>
DCNV3_HD Bilinear<acc_t> make_bilinear(
    acc_t px,
    acc_t py,
    int64_t H,
    int64_t W,
    int64_t row_stride,
    int64_t col_stride) {
  Bilinear<acc_t> b;
DCNV3_UNROLL
  for (int k = 0; k < 4; ++k) {
    b.off[k] = 0;
    b.w[k] = acc_t(0);
    b.wx[k] = acc_t(0);
    b.wy[k] = acc_t(0);
  }
  b.fx = acc_t(0);
  b.fy = acc_t(0);
  b.any = false;
  // No corner inside the image (written so that NaN positions also exit).
  // px == -1 stays: corner x0+1 = 0 has zero weight but a nonzero derivative.
  if (!(px >= acc_t(-1) && py >= acc_t(-1) && px < static_cast<acc_t>(W) &&
        py < static_cast<acc_t>(H))) {
    return b;
  }
  // floor() by truncation: px, py >= -1 here, so only -1 < v < 0 needs care.
  int64_t x0 = static_cast<int64_t>(px);
  int64_t y0 = static_cast<int64_t>(py);
  x0 -= static_cast<acc_t>(x0) > px ? 1 : 0;
  y0 -= static_cast<acc_t>(y0) > py ? 1 : 0;
  const acc_t fx = px - static_cast<acc_t>(x0);
  const acc_t fy = py - static_cast<acc_t>(y0);
  b.fx = fx;
  b.fy = fy;
  const acc_t gx = acc_t(1) - fx;
  const acc_t gy = acc_t(1) - fy;
  const bool vx0 = x0 >= 0;
  const bool vx1 = x0 + 1 <= W - 1;
  const bool vy0 = y0 >= 0;
  const bool vy1 = y0 + 1 <= H - 1;
  const acc_t w[4] = {gy * gx, gy * fx, fy * gx, fy * fx};
  const acc_t wx[4] = {-gy, gy, -fy, fy};
  const acc_t wy[4] = {-gx, -fx, gx, fx};
  const bool v[4] = {vy0 && vx0, vy0 && vx1, vy1 && vx0, vy1 && vx1};
  const int64_t yy[4] = {y0, y0, y0 + 1, y0 + 1};
  const int64_t xx[4] = {x0, x0 + 1, x0, x0 + 1};
DCNV3_UNROLL
  for (int k = 0; k < 4; ++k) {
    if (v[k]) {
      b.off[k] = yy[k] * row_stride + xx[k] * col_stride;
      b.w[k] = w[k];
      b.wx[k] = wx[k];
      b.wy[k] = wy[k];
      b.any = true;
    }
  }
  return b;
}

// Interpolated value of one channel; `base` points at that channel of pixel
// (0, 0) of the current batch element and group.
template <typename acc_t, typename scalar_t>
DCNV3_HD acc_t sample_value(const scalar_t* base, const Bilinear<acc_t>& b) {
  return b.w[0] * static_cast<acc_t>(base[b.off[0]]) +
      b.w[1] * static_cast<acc_t>(base[b.off[1]]) +
      b.w[2] * static_cast<acc_t>(base[b.off[2]]) +
      b.w[3] * static_cast<acc_t>(base[b.off[3]]);
}

// Interpolated value of one channel and its derivatives w.r.t. px and py.
template <typename acc_t, typename scalar_t>
DCNV3_HD void sample_value_grad(
    const scalar_t* base,
    const Bilinear<acc_t>& b,
    acc_t& value,
    acc_t& d_px,
    acc_t& d_py) {
  const acc_t v0 = static_cast<acc_t>(base[b.off[0]]);
  const acc_t v1 = static_cast<acc_t>(base[b.off[1]]);
  const acc_t v2 = static_cast<acc_t>(base[b.off[2]]);
  const acc_t v3 = static_cast<acc_t>(base[b.off[3]]);
  value = b.w[0] * v0 + b.w[1] * v1 + b.w[2] * v2 + b.w[3] * v3;
  d_px = b.wx[0] * v0 + b.wx[1] * v1 + b.wx[2] * v2 + b.wx[3] * v3;
  d_py = b.wy[0] * v0 + b.wy[1] * v1 + b.wy[2] * v2 + b.wy[3] * v3;
}

// Same as sample_value_grad() when all four corners are inside the image,
// from the corner values directly (fewer operations, used by the CPU loops).
template <typename acc_t>
DCNV3_HD void bilinear_interior(
    acc_t v0,
    acc_t v1,
    acc_t v2,
    acc_t v3,
    acc_t fx,
    acc_t fy,
    acc_t& value,
    acc_t& d_px,
    acc_t& d_py) {
  const acc_t a = v1 - v0;
  const acc_t c = v3 - v2;
  const acc_t top = v0 + fx * a;
  const acc_t bot = v2 + fx * c;
  value = top + fy * (bot - top);
  d_px = a + fy * (c - a);
  d_py = bot - top;
}

// Scatters `g` (the gradient of the sampled value of one channel) to the four
// corners through `add(ptr, value)`: a plain add on CPU, an atomic on GPU.
template <typename acc_t, typename T, typename AddFn>
DCNV3_HD void scatter_grad(T* base, const Bilinear<acc_t>& b, acc_t g, AddFn add) {
DCNV3_UNROLL
  for (int k = 0; k < 4; ++k) {
    if (b.w[k] != acc_t(0)) {
      add(base + b.off[k], static_cast<T>(b.w[k] * g));
    }
  }
}

// Gradients of the offset pair from the derivatives of the loss w.r.t. the
// sampling position: px and py move by offset_scale per unit offset.
template <typename acc_t>
DCNV3_HD void offset_grad(
    const Geometry& g,
    acc_t grad_px,
    acc_t grad_py,
    acc_t& grad_off_x,
    acc_t& grad_off_y) {
  const acc_t scale = static_cast<acc_t>(g.offset_scale);
  grad_off_x = grad_px * scale;
  grad_off_y = grad_py * scale;
}

// In-place numerically stable softmax over n values.
template <typename acc_t>
DCNV3_HD void softmax_inplace(acc_t* v, int64_t n) {
  acc_t mx = v[0];
  for (int64_t k = 1; k < n; ++k) {
    mx = v[k] > mx ? v[k] : mx;
  }
  acc_t s = acc_t(0);
  for (int64_t k = 0; k < n; ++k) {
    v[k] = exp_(v[k] - mx);
    s += v[k];
  }
  const acc_t inv = acc_t(1) / s;
  for (int64_t k = 0; k < n; ++k) {
    v[k] *= inv;
  }
}

// Max and reciprocal sum of exp for an on-the-fly softmax over n logits:
// prob[k] = exp(logit[k] - mx) * inv_sum.
template <typename acc_t, typename scalar_t>
DCNV3_HD void softmax_stats(const scalar_t* logits, int64_t n, acc_t& mx, acc_t& inv_sum) {
  mx = static_cast<acc_t>(logits[0]);
  for (int64_t k = 1; k < n; ++k) {
    const acc_t v = static_cast<acc_t>(logits[k]);
    mx = v > mx ? v : mx;
  }
  acc_t s = acc_t(0);
  for (int64_t k = 0; k < n; ++k) {
    s += exp_(static_cast<acc_t>(logits[k]) - mx);
  }
  inv_sum = acc_t(1) / s;
}

// Turns d loss / d softmax(prob) into d loss / d logits, in place.
template <typename acc_t>
DCNV3_HD void softmax_backward_inplace(const acc_t* prob, acc_t* grad, int64_t n) {
  acc_t dot = acc_t(0);
  for (int64_t k = 0; k < n; ++k) {
    dot += prob[k] * grad[k];
  }
  for (int64_t k = 0; k < n; ++k) {
    grad[k] = prob[k] * (grad[k] - dot);
  }
}

}  // namespace dcnv3
