// CPU kernels of DCNv3 (forward and backward), on the torch stable ABI.
//
// Layout is NHWC, so the channels of one group are contiguous: every loop
// computes the sampling position, bilinear stencil and mask once per
// (output pixel, group, point) and then runs a contiguous, vectorisable loop
// over the group's channels.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../dcnv3_common.h"

// The hot loops are compiled twice on x86-64: for the baseline ISA and for
// AVX2+FMA, chosen at run time. The bodies are always-inline templates, so
// the AVX2 code exists only inside the target("avx2,fma") wrappers and no
// shared inline function is ever compiled for AVX2 (no ODR hazard).
#if defined(__GNUC__) && defined(__x86_64__)
#define DCNV3_X86_DISPATCH 1
#define DCNV3_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif
#if defined(__GNUC__)
#define DCNV3_INLINE inline __attribute__((always_inline))
#else
#define DCNV3_INLINE inline
#endif

namespace dcnv3 {
namespace {

// Whether to use the AVX2+FMA loops (set TIMM_INTERNIMAGE_DCNV3_CPU_ISA=baseline to disable).
bool use_avx2() {
#if defined(DCNV3_X86_DISPATCH)
  static const bool enabled = [] {
    const char* isa = std::getenv("TIMM_INTERNIMAGE_DCNV3_CPU_ISA");
    if (isa != nullptr && std::strcmp(isa, "baseline") == 0) {
      return false;
    }
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return enabled;
#else
  return false;
#endif
}

constexpr int64_t kGrainWork = 1 << 14;  // scalar multiply-adds per task, roughly
constexpr double kMaxBufferBytes = 256.0 * (1 << 20);  // private grad_input buffers, all threads

int64_t grain_for(const Geometry& g, int64_t per_item) {
  return std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, per_item));
}

// acc[c] += m * sample_value(base + c, b) for c < C, with the corner rows
// hoisted so that the loop vectorises.
template <typename acc_t, typename scalar_t>
DCNV3_INLINE void accumulate_channels(acc_t* __restrict__ acc, const scalar_t* base, const Bilinear<acc_t>& b, acc_t m, int64_t C) {
  const scalar_t* __restrict__ x0 = base + b.off[0];
  const scalar_t* __restrict__ x1 = base + b.off[1];
  const scalar_t* __restrict__ x2 = base + b.off[2];
  const scalar_t* __restrict__ x3 = base + b.off[3];
  const acc_t w0 = m * b.w[0], w1 = m * b.w[1], w2 = m * b.w[2], w3 = m * b.w[3];
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    acc[c] += w0 * static_cast<acc_t>(x0[c]) + w1 * static_cast<acc_t>(x1[c]) + w2 * static_cast<acc_t>(x2[c]) +
        w3 * static_cast<acc_t>(x3[c]);
  }
}

template <typename acc_t>
void kernel_grid_table(const Geometry& g, std::vector<acc_t>& kx, std::vector<acc_t>& ky) {
  kx.resize(g.P);
  ky.resize(g.P);
  for (int64_t p = 0; p < g.P; ++p) {
    kernel_grid<acc_t>(g, p, kx[p], ky[p]);
  }
}

// Forward of output pixels [begin, end). Scratch: acc (C), prob (P).
template <typename scalar_t>
DCNV3_INLINE void forward_range(
    const Geometry& g,
    const scalar_t* x,
    const scalar_t* off,
    const scalar_t* mask,
    scalar_t* out,
    const opmath_t<scalar_t>* kx,
    const opmath_t<scalar_t>* ky,
    int64_t begin,
    int64_t end,
    opmath_t<scalar_t>* acc,
    opmath_t<scalar_t>* prob) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t GC = g.G * g.C;
  const int64_t row = g.W * GC;
  const int64_t P = g.P;
  const int64_t C = g.C;
  for (int64_t pos = begin; pos < end; ++pos) {
    const int64_t wo = pos % g.Wo;
    const int64_t ho = (pos / g.Wo) % g.Ho;
    const int64_t n = pos / (g.Wo * g.Ho);
    const scalar_t* xn = x + n * g.H * row;
    for (int64_t gi = 0; gi < g.G; ++gi) {
      const scalar_t* offp = off + (pos * g.G + gi) * P * 2;
      const scalar_t* mp = mask + (pos * g.G + gi) * P;
      for (int64_t p = 0; p < P; ++p) {
        prob[p] = static_cast<acc_t>(mp[p]);
      }
      if (g.mask_logits) {
        softmax_inplace(prob, P);
      }
      for (int64_t c = 0; c < C; ++c) {
        acc[c] = acc_t(0);
      }
      const scalar_t* xg = xn + gi * C;
      for (int64_t p = 0; p < P; ++p) {
        acc_t px, py;
        sample_position<acc_t>(
            g, ho, wo, kx[p], ky[p], static_cast<acc_t>(offp[2 * p]), static_cast<acc_t>(offp[2 * p + 1]), px, py);
        const Bilinear<acc_t> b = make_bilinear<acc_t>(px, py, g.H, g.W, row, GC);
        if (!b.any) {
          continue;
        }
        accumulate_channels<acc_t>(acc, xg, b, prob[p], C);
      }
      scalar_t* o = out + pos * GC + gi * C;
      for (int64_t c = 0; c < C; ++c) {
        o[c] = static_cast<scalar_t>(acc[c]);
      }
    }
  }
}

#define DCNV3_FORWARD_RANGE_ARGS                                                                                 \
  const Geometry &g, const scalar_t *x, const scalar_t *off, const scalar_t *mask, scalar_t *out,                \
      const opmath_t<scalar_t> *kx, const opmath_t<scalar_t> *ky, int64_t begin, int64_t end, opmath_t<scalar_t> *acc, \
      opmath_t<scalar_t> *prob
template <typename scalar_t>
void forward_range_baseline(DCNV3_FORWARD_RANGE_ARGS) {
  forward_range<scalar_t>(g, x, off, mask, out, kx, ky, begin, end, acc, prob);
}
#if defined(DCNV3_X86_DISPATCH)
template <typename scalar_t>
DCNV3_TARGET_AVX2 void forward_range_avx2(DCNV3_FORWARD_RANGE_ARGS) {
  forward_range<scalar_t>(g, x, off, mask, out, kx, ky, begin, end, acc, prob);
}
#endif

template <typename scalar_t>
void forward_kernel(const Geometry& g, const scalar_t* x, const scalar_t* off, const scalar_t* mask, scalar_t* out) {
  using acc_t = opmath_t<scalar_t>;
  std::vector<acc_t> kx, ky;
  kernel_grid_table(g, kx, ky);
  auto range_fn = &forward_range_baseline<scalar_t>;
#if defined(DCNV3_X86_DISPATCH)
  if (use_avx2()) {
    range_fn = &forward_range_avx2<scalar_t>;
  }
#endif
  torch::stable::parallel_for(0, g.positions(), grain_for(g, g.G * g.P * g.C * 4), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(g.C), prob(g.P);
    range_fn(g, x, off, mask, out, kx.data(), ky.data(), begin, end, acc.data(), prob.data());
  });
}

// One pass over the channels of a sample whose four corners are all inside
// the image (so the four grad_input rows are distinct): accumulates
// sum_c go*value, go*d value/d px, go*d value/d py and scatters m*go*w_k.
template <typename acc_t, typename scalar_t>
DCNV3_INLINE void backward_channels_interior(
    const scalar_t* xg,
    acc_t* gin,
    const scalar_t* __restrict__ go,
    const Bilinear<acc_t>& b,
    acc_t m,
    int64_t C,
    acc_t& s_v_out,
    acc_t& s_x_out,
    acc_t& s_y_out) {
  const scalar_t* __restrict__ x0 = xg + b.off[0];
  const scalar_t* __restrict__ x1 = xg + b.off[1];
  const scalar_t* __restrict__ x2 = xg + b.off[2];
  const scalar_t* __restrict__ x3 = xg + b.off[3];
  acc_t* __restrict__ d0 = gin + b.off[0];
  acc_t* __restrict__ d1 = gin + b.off[1];
  acc_t* __restrict__ d2 = gin + b.off[2];
  acc_t* __restrict__ d3 = gin + b.off[3];
  const acc_t fx = b.fx, fy = b.fy;
  const acc_t mw0 = m * b.w[0], mw1 = m * b.w[1], mw2 = m * b.w[2], mw3 = m * b.w[3];
  acc_t s_v = 0, s_x = 0, s_y = 0;
#pragma omp simd reduction(+ : s_v, s_x, s_y)
  for (int64_t c = 0; c < C; ++c) {
    acc_t v, dx, dy;
    bilinear_interior<acc_t>(
        static_cast<acc_t>(x0[c]), static_cast<acc_t>(x1[c]), static_cast<acc_t>(x2[c]), static_cast<acc_t>(x3[c]), fx,
        fy, v, dx, dy);
    const acc_t gc = static_cast<acc_t>(go[c]);
    s_v += gc * v;
    s_x += gc * dx;
    s_y += gc * dy;
    d0[c] += mw0 * gc;
    d1[c] += mw1 * gc;
    d2[c] += mw2 * gc;
    d3[c] += mw3 * gc;
  }
  s_v_out = s_v;
  s_x_out = s_x;
  s_y_out = s_y;
}

// Backward of the output pixels [hw_begin, hw_end) of batch element n, group
// gi. grad_input contributions go to gin (acc_t, laid out like the input,
// pointing at channel 0 of group gi of batch element n); the caller makes
// sure no other thread writes the same gin at the same time.
template <typename scalar_t>
DCNV3_INLINE void backward_range(
    const Geometry& g,
    int64_t n,
    int64_t gi,
    int64_t hw_begin,
    int64_t hw_end,
    const scalar_t* grad_out,
    const scalar_t* x,
    const scalar_t* off,
    const scalar_t* mask,
    opmath_t<scalar_t>* gin,
    scalar_t* grad_off,
    scalar_t* grad_mask,
    opmath_t<scalar_t>* prob,
    const opmath_t<scalar_t>* kx,
    const opmath_t<scalar_t>* ky,
    opmath_t<scalar_t>* gm) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t GC = g.G * g.C;
  const int64_t row = g.W * GC;
  const int64_t P = g.P;
  const int64_t C = g.C;
  const scalar_t* xg = x + n * g.H * row + gi * C;
  for (int64_t hw = hw_begin; hw < hw_end; ++hw) {
    const int64_t pos = n * g.Ho * g.Wo + hw;
    const int64_t wo = hw % g.Wo;
    const int64_t ho = hw / g.Wo;
    const int64_t pg = pos * g.G + gi;
    const scalar_t* offp = off + pg * P * 2;
    const scalar_t* mp = mask + pg * P;
    const scalar_t* go = grad_out + pos * GC + gi * C;
    for (int64_t p = 0; p < P; ++p) {
      prob[p] = static_cast<acc_t>(mp[p]);
    }
    if (g.mask_logits) {
      softmax_inplace(prob, P);
    }
    for (int64_t p = 0; p < P; ++p) {
      acc_t px, py;
      sample_position<acc_t>(
          g, ho, wo, kx[p], ky[p], static_cast<acc_t>(offp[2 * p]), static_cast<acc_t>(offp[2 * p + 1]), px, py);
      const Bilinear<acc_t> b = make_bilinear<acc_t>(px, py, g.H, g.W, row, GC);
      acc_t s_v = 0, s_x = 0, s_y = 0;
      if (b.any) {
        const acc_t m = prob[p];
        if (b.w[0] != acc_t(0) && b.w[1] != acc_t(0) && b.w[2] != acc_t(0) && b.w[3] != acc_t(0)) {
          // Common case, all four corners inside and distinct: one fused pass.
          backward_channels_interior<acc_t>(xg, gin, go, b, m, C, s_v, s_x, s_y);
        } else {
        const scalar_t* __restrict__ x0 = xg + b.off[0];
        const scalar_t* __restrict__ x1 = xg + b.off[1];
        const scalar_t* __restrict__ x2 = xg + b.off[2];
        const scalar_t* __restrict__ x3 = xg + b.off[3];
        // Same arithmetic as sample_value_grad(), with the corner rows hoisted
        // so the channel loop vectorises (reductions via omp simd).
#pragma omp simd reduction(+ : s_v, s_x, s_y)
        for (int64_t c = 0; c < C; ++c) {
          const acc_t v0 = static_cast<acc_t>(x0[c]);
          const acc_t v1 = static_cast<acc_t>(x1[c]);
          const acc_t v2 = static_cast<acc_t>(x2[c]);
          const acc_t v3 = static_cast<acc_t>(x3[c]);
          const acc_t gc = static_cast<acc_t>(go[c]);
          s_v += gc * (b.w[0] * v0 + b.w[1] * v1 + b.w[2] * v2 + b.w[3] * v3);
          s_x += gc * (b.wx[0] * v0 + b.wx[1] * v1 + b.wx[2] * v2 + b.wx[3] * v3);
          s_y += gc * (b.wy[0] * v0 + b.wy[1] * v1 + b.wy[2] * v2 + b.wy[3] * v3);
        }
        // scatter_grad(), one corner at a time.
        for (int k = 0; k < 4; ++k) {
          if (b.w[k] == acc_t(0)) {
            continue;
          }
          const acc_t wk = m * b.w[k];
          acc_t* __restrict__ dst = gin + b.off[k];
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            dst[c] += wk * static_cast<acc_t>(go[c]);
          }
        }
        }
        s_x *= m;
        s_y *= m;
      }
      acc_t gox, goy;
      offset_grad<acc_t>(g, s_x, s_y, gox, goy);
      grad_off[pg * P * 2 + 2 * p] = static_cast<scalar_t>(gox);
      grad_off[pg * P * 2 + 2 * p + 1] = static_cast<scalar_t>(goy);
      gm[p] = s_v;
    }
    if (g.mask_logits) {
      softmax_backward_inplace(prob, gm, P);
    }
    for (int64_t p = 0; p < P; ++p) {
      grad_mask[pg * P + p] = static_cast<scalar_t>(gm[p]);
    }
  }
}

#define DCNV3_BACKWARD_RANGE_ARGS                                                                               \
  const Geometry &g, int64_t n, int64_t gi, int64_t hw_begin, int64_t hw_end, const scalar_t *grad_out,         \
      const scalar_t *x, const scalar_t *off, const scalar_t *mask, opmath_t<scalar_t> *gin, scalar_t *grad_off, \
      scalar_t *grad_mask, opmath_t<scalar_t> *prob, const opmath_t<scalar_t> *kx, const opmath_t<scalar_t> *ky, \
      opmath_t<scalar_t> *gm
#define DCNV3_BACKWARD_RANGE_CALL \
  backward_range<scalar_t>(g, n, gi, hw_begin, hw_end, grad_out, x, off, mask, gin, grad_off, grad_mask, prob, kx, ky, gm)
template <typename scalar_t>
void backward_range_baseline(DCNV3_BACKWARD_RANGE_ARGS) {
  DCNV3_BACKWARD_RANGE_CALL;
}
#if defined(DCNV3_X86_DISPATCH)
template <typename scalar_t>
DCNV3_TARGET_AVX2 void backward_range_avx2(DCNV3_BACKWARD_RANGE_ARGS) {
  DCNV3_BACKWARD_RANGE_CALL;
}
#endif

template <typename scalar_t>
void backward_kernel(
    const Geometry& g,
    const scalar_t* grad_out,
    const scalar_t* x,
    const scalar_t* off,
    const scalar_t* mask,
    opmath_t<scalar_t>* gin,  // zero-initialised, input layout
    scalar_t* grad_off,
    scalar_t* grad_mask) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t HWo = g.Ho * g.Wo;
  const int64_t in_plane = g.H * g.W * g.G * g.C;  // input elements per batch element
  const int64_t tasks = g.N * g.G;
  const int64_t threads = static_cast<int64_t>(torch::stable::get_num_threads());
  const int64_t work_per_pixel = g.P * g.C * 8;
  std::vector<acc_t> kx, ky;
  kernel_grid_table(g, kx, ky);
  auto range_fn = &backward_range_baseline<scalar_t>;
#if defined(DCNV3_X86_DISPATCH)
  if (use_avx2()) {
    range_fn = &backward_range_avx2<scalar_t>;
  }
#endif
  // Private-buffer strategy only when there are fewer slices than threads
  // and the buffers stay small; otherwise one thread per slice.
  const int64_t chunks = std::min<int64_t>(threads, std::max<int64_t>(1, HWo / 16));
  const int64_t total = g.N * in_plane;
  const bool small_buffers = static_cast<double>(chunks) * static_cast<double>(total) * sizeof(acc_t) <= kMaxBufferBytes;
  if (tasks >= threads || tasks * HWo * work_per_pixel < kGrainWork || !small_buffers) {
    // Each (batch element, group) owns a disjoint slice of grad_input.
    torch::stable::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> prob(g.P), gm(g.P);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / g.G;
        const int64_t gi = t % g.G;
        range_fn(
            g, n, gi, 0, HWo, grad_out, x, off, mask, gin + n * in_plane + gi * g.C, grad_off, grad_mask, prob.data(), kx.data(), ky.data(), gm.data());
      }
    });
    return;
  }
  // Few (batch element, group) pairs: split the output pixels into chunks,
  // each accumulating into a private grad_input buffer, then reduce.
  std::vector<std::vector<acc_t>> bufs(chunks);
  torch::stable::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> prob(g.P), gm(g.P);
    for (int64_t k = begin; k < end; ++k) {
      std::vector<acc_t>& buf = bufs[k];
      buf.assign(total, acc_t(0));
      const int64_t lo = HWo * k / chunks;
      const int64_t hi = HWo * (k + 1) / chunks;
      for (int64_t n = 0; n < g.N; ++n) {
        for (int64_t gi = 0; gi < g.G; ++gi) {
          range_fn(
              g, n, gi, lo, hi, grad_out, x, off, mask, buf.data() + n * in_plane + gi * g.C, grad_off, grad_mask,
              prob.data(), kx.data(), ky.data(), gm.data());
        }
      }
    }
  });
  torch::stable::parallel_for(0, total, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t k = 0; k < chunks; ++k) {
      const acc_t* b = bufs[k].data();
      for (int64_t i = begin; i < end; ++i) {
        gin[i] += b[i];
      }
    }
  });
}

Tensor forward_impl(
    const Tensor& input_,
    const Tensor& offset_,
    const Tensor& mask_,
    int64_t kernel_h,
    int64_t kernel_w,
    int64_t stride_h,
    int64_t stride_w,
    int64_t pad_h,
    int64_t pad_w,
    int64_t dilation_h,
    int64_t dilation_w,
    int64_t group,
    int64_t group_channels,
    double offset_scale,
    bool remove_center,
    bool mask_logits) {
  const char* name = "timm_internimage::dcnv3_forward (CPU)";
  STD_TORCH_CHECK(input_.is_cpu() && offset_.is_cpu() && mask_.is_cpu(), name, ": expected CPU tensors");
  const Geometry g = make_geometry(
      name, input_, offset_, mask_, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
      group, group_channels, offset_scale, remove_center, mask_logits);
  const Tensor input = torch::stable::contiguous(input_);
  const Tensor offset = torch::stable::contiguous(offset_);
  const Tensor mask = torch::stable::contiguous(mask_);
  Tensor out = torch::stable::new_empty(input, output_shape(g));
  if (out.numel() == 0) {
    return out;
  }
  dispatch_floating(input.scalar_type(), name, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    forward_kernel<scalar_t>(
        g, input.const_data_ptr<scalar_t>(), offset.const_data_ptr<scalar_t>(), mask.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> backward_impl(
    const Tensor& grad_output_,
    const Tensor& input_,
    const Tensor& offset_,
    const Tensor& mask_,
    int64_t kernel_h,
    int64_t kernel_w,
    int64_t stride_h,
    int64_t stride_w,
    int64_t pad_h,
    int64_t pad_w,
    int64_t dilation_h,
    int64_t dilation_w,
    int64_t group,
    int64_t group_channels,
    double offset_scale,
    bool remove_center,
    bool mask_logits) {
  const char* name = "timm_internimage::dcnv3_backward (CPU)";
  STD_TORCH_CHECK(
      grad_output_.is_cpu() && input_.is_cpu() && offset_.is_cpu() && mask_.is_cpu(), name, ": expected CPU tensors");
  const Geometry g = make_geometry(
      name, input_, offset_, mask_, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
      group, group_channels, offset_scale, remove_center, mask_logits);
  check_grad_output(name, grad_output_, input_, g);
  const Tensor grad_output = torch::stable::contiguous(grad_output_);
  const Tensor input = torch::stable::contiguous(input_);
  const Tensor offset = torch::stable::contiguous(offset_);
  const Tensor mask = torch::stable::contiguous(mask_);
  // float/double accumulate into grad_input itself (zeroed); the half types
  // accumulate into a float buffer and grad_input is written by the cast.
  const bool direct = input.scalar_type() == ScalarType::Float || input.scalar_type() == ScalarType::Double;
  Tensor grad_input = direct ? torch::stable::new_zeros(input, {g.N, g.H, g.W, g.G * g.C})
                             : torch::stable::new_empty(input, {g.N, g.H, g.W, g.G * g.C});
  // Every element of grad_offset and grad_mask is written by the kernels.
  Tensor grad_offset = torch::stable::new_empty(offset, {g.N, g.Ho, g.Wo, g.G * g.P * 2});
  Tensor grad_mask = torch::stable::new_empty(mask, {g.N, g.Ho, g.Wo, g.G * g.P});
  if (grad_output.numel() == 0 || input.numel() == 0) {
    return std::make_tuple(grad_input, grad_offset, grad_mask);
  }
  dispatch_floating(input.scalar_type(), name, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = opmath_t<scalar_t>;
    acc_t* gin = nullptr;
    std::vector<acc_t> gin_acc;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      gin = grad_input.mutable_data_ptr<scalar_t>();
    } else {
      gin_acc.assign(grad_input.numel(), acc_t(0));
      gin = gin_acc.data();
    }
    backward_kernel<scalar_t>(
        g, grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
        offset.const_data_ptr<scalar_t>(), mask.const_data_ptr<scalar_t>(), gin,
        grad_offset.mutable_data_ptr<scalar_t>(), grad_mask.mutable_data_ptr<scalar_t>());
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      scalar_t* dst = grad_input.mutable_data_ptr<scalar_t>();
      torch::stable::parallel_for(0, grad_input.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          dst[i] = static_cast<scalar_t>(gin[i]);
        }
      });
    }
  });
  return std::make_tuple(grad_input, grad_offset, grad_mask);
}

}  // namespace
}  // namespace dcnv3

STABLE_TORCH_LIBRARY_IMPL(timm_internimage, CPU, m) {
  m.impl("dcnv3_forward", TORCH_BOX((&dcnv3::forward_entry<&dcnv3::forward_impl, false>)));
  m.impl("dcnv3_backward", TORCH_BOX((&dcnv3::backward_entry<&dcnv3::backward_impl, false>)));
  m.impl("dcnv3_softmax_forward", TORCH_BOX((&dcnv3::forward_entry<&dcnv3::forward_impl, true>)));
  m.impl("dcnv3_softmax_backward", TORCH_BOX((&dcnv3::backward_entry<&dcnv3::backward_impl, true>)));
}
