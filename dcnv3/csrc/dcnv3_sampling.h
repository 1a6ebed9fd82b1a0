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
#elif defined(_MSC_VER)
#define DCNV3_HD __forceinline
#define DCNV3_UNROLL
#elif defined(__GNUC__) || defined(__clang__)
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

// Accumulation type: float for the half types and float, double for double.
template <typename T>
struct OpMath {
  using type = float;
};
template <>
struct OpMath<double> {
  using type = double;
};
template <typename T>
using opmath_t = typename OpMath<T>::type;

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
  // Addressing of the offsets and point weights (and of their gradients):
  // the offset pair of point p of group gi of output pixel pos is at
  // pos * off_pixel + gi * off_group + 2p (+1 for y), its weight at
  // pos * mask_pixel + gi * mask_group + p of the weights' base pointer.
  // DCNv3 (separate offset and mask): G*2P, 2P, G*P, P. DCNv4 (one packed
  // offset_mask of M channels, per group 2P offsets then P weights): M, 3P,
  // M, 3P, with the weights' base pointer 2P elements into offset_mask.
  int64_t off_pixel, off_group, mask_pixel, mask_group;

  DCNV3_HD int64_t positions() const { return N * Ho * Wo; }
  // Whether the points of consecutive groups follow each other in both
  // tensors (DCNv3's layout), so that the points of several groups form one run.
  DCNV3_HD bool groups_packed() const { return off_group == 2 * P && mask_group == P; }
};

// The addressing of DCNv3's separate offset and mask tensors.
DCNV3_HD void set_separate_layout(Geometry& g) {
  g.off_pixel = g.G * g.P * 2;
  g.off_group = g.P * 2;
  g.mask_pixel = g.G * g.P;
  g.mask_group = g.P;
}

// The addressing of DCNv4's packed offset_mask with `channels` channels per
// pixel (3*G*P, or padded up to a multiple of 8 as the official module does).
DCNV3_HD void set_packed_layout(Geometry& g, int64_t channels) {
  g.off_pixel = channels;
  g.off_group = g.P * 3;
  g.mask_pixel = channels;
  g.mask_group = g.P * 3;
}

// An output pixel and group, from the flat index pg = pos * G + gi of a
// (pixel, group) pair: batch n, row ho, column wo, pixel pos, group gi.
struct PixelGroup {
  int64_t n, ho, wo, pos, gi;
};

DCNV3_HD PixelGroup pixel_group(const Geometry& g, int64_t pg) {
  PixelGroup at;
  at.gi = pg % g.G;
  at.pos = pg / g.G;
  at.wo = at.pos % g.Wo;
  at.ho = (at.pos / g.Wo) % g.Ho;
  at.n = at.pos / (g.Wo * g.Ho);
  return at;
}

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

// Bilinear stencil of one sampling position, in the official CUDA kernel's
// semantics: a sample counts only if -1 < px < W and -1 < py < H (strict, so
// NaN and +-inf fail), and its corners are floor(p) and floor(p) + 1, so the
// position derivative at an exact integer is the forward difference. Corner k
// is (y0,x0), (y0,x1), (y1,x0), (y1,x1) for k = 0..3. The corner coordinates
// are clamped into the image, so every read through them is in bounds; a
// corner outside the image (or of a sample that does not count) has zero
// weight and zero derivatives and so contributes nothing. Written without
// branches so that the CPU kernels can compute the stencils of many kernel
// points in one vectorised loop.
template <typename acc_t>
struct Stencil {
  int32_t x0, x1, y0, y1;  // clamped corner columns and rows
  acc_t w[4];              // interpolation weights
  acc_t wx[4];             // d w / d px
  acc_t wy[4];             // d w / d py
  bool interior;           // all four corners inside: four distinct pixels
  bool counts;             // -1 < px < W and -1 < py < H: the sample takes part
};

// v (an integer in floating point) clamped into [0, last].
template <typename acc_t>
DCNV3_HD acc_t clamp_coord(acc_t v, acc_t last) {
  const acc_t low = v < acc_t(0) ? acc_t(0) : v;
  return low > last ? last : low;
}

template <typename acc_t>
DCNV3_HD Stencil<acc_t> make_stencil(acc_t px, acc_t py, int32_t H, int32_t W) {
  // Comparisons with NaN are false, so a NaN position does not count.
  const bool counts = (px > acc_t(-1)) & (px < static_cast<acc_t>(W)) & (py > acc_t(-1)) & (py < static_cast<acc_t>(H));
  // A sample that does not count gets a position whose corners are all outside,
  // which keeps NaN and huge values out of the integer conversion.
  px = counts ? px : acc_t(-2);
  py = counts ? py : acc_t(-2);
  const acc_t x0f = floor_(px);
  const acc_t y0f = floor_(py);
  const acc_t fx = px - x0f;
  const acc_t fy = py - y0f;
  // Corner validity as factors of 1 or 0 per axis, and clamping, in floating
  // point (the floors are small integers, exact in acc_t): one kind of
  // comparison and no branches, which the compilers vectorise. Products with
  // the factors equal the plain weights exactly where a corner is valid.
  const acc_t one = acc_t(1);
  const acc_t zero = acc_t(0);
  const acc_t last_x = static_cast<acc_t>(W - 1);
  const acc_t last_y = static_cast<acc_t>(H - 1);
  const acc_t ax0 = x0f >= zero ? one : zero;  // x0f <= W - 1 always: px < W or px = -2
  const acc_t ax1 = (x0f >= -one ? one : zero) * (x0f < last_x ? one : zero);
  const acc_t ay0 = y0f >= zero ? one : zero;
  const acc_t ay1 = (y0f >= -one ? one : zero) * (y0f < last_y ? one : zero);
  const acc_t ex0 = ax0 * (one - fx), ex1 = ax1 * fx;  // x factors of corners x0, x1
  const acc_t ey0 = ay0 * (one - fy), ey1 = ay1 * fy;
  Stencil<acc_t> s;
  s.x0 = static_cast<int32_t>(clamp_coord(x0f, last_x));
  s.x1 = static_cast<int32_t>(clamp_coord(x0f + one, last_x));
  s.y0 = static_cast<int32_t>(clamp_coord(y0f, last_y));
  s.y1 = static_cast<int32_t>(clamp_coord(y0f + one, last_y));
  s.w[0] = ey0 * ex0;
  s.w[1] = ey0 * ex1;
  s.w[2] = ey1 * ex0;
  s.w[3] = ey1 * ex1;
  s.wx[0] = -(ey0 * ax0);
  s.wx[1] = ey0 * ax1;
  s.wx[2] = -(ey1 * ax0);
  s.wx[3] = ey1 * ax1;
  s.wy[0] = -(ay0 * ex0);
  s.wy[1] = -(ay0 * ex1);
  s.wy[2] = ay1 * ex0;
  s.wy[3] = ay1 * ex1;
  s.interior = ax0 * ax1 * ay0 * ay1 > zero;
  s.counts = counts;
  return s;
}

// The mask weight m of a sample, or 0 for a sample that does not count, even
// when m is NaN: the official kernel skips such a sample entirely.
template <typename acc_t>
DCNV3_HD acc_t sample_weight(const Stencil<acc_t>& s, acc_t m) {
  return s.counts ? m : acc_t(0);
}

// Element offsets of the four corner pixels (channel 0 of the group) with
// clamped columns x0, x1 and rows y0, y1, in 64-bit arithmetic: a whole
// input can exceed 2^31 elements.
DCNV3_HD void corner_offsets(
    int32_t x0,
    int32_t x1,
    int32_t y0,
    int32_t y1,
    int64_t row_stride,
    int64_t col_stride,
    int64_t off[4]) {
  const int64_t r0 = static_cast<int64_t>(y0) * row_stride;
  const int64_t r1 = static_cast<int64_t>(y1) * row_stride;
  const int64_t c0 = static_cast<int64_t>(x0) * col_stride;
  const int64_t c1 = static_cast<int64_t>(x1) * col_stride;
  off[0] = r0 + c0;
  off[1] = r0 + c1;
  off[2] = r1 + c0;
  off[3] = r1 + c1;
}

template <typename acc_t>
DCNV3_HD void stencil_offsets(const Stencil<acc_t>& s, int64_t row_stride, int64_t col_stride, int64_t off[4]) {
  corner_offsets(s.x0, s.x1, s.y0, s.y1, row_stride, col_stride, off);
}

// The sampled value and its derivatives w.r.t. px and py from the four
// corner values of one channel.
template <typename acc_t>
DCNV3_HD void stencil_value_grad(
    const Stencil<acc_t>& s, const acc_t v[4], acc_t& value, acc_t& d_px, acc_t& d_py) {
  value = s.w[0] * v[0] + s.w[1] * v[1] + s.w[2] * v[2] + s.w[3] * v[3];
  d_px = s.wx[0] * v[0] + s.wx[1] * v[1] + s.wx[2] * v[2] + s.wx[3] * v[3];
  d_py = s.wy[0] * v[0] + s.wy[1] * v[1] + s.wy[2] * v[2] + s.wy[3] * v[3];
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
