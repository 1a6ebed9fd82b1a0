// CPU kernels of DCNv3 (forward and backward), on the torch stable ABI.
//
// Layout is NHWC, so the channels of one group are contiguous. For each
// output pixel the kernels first compute the bilinear stencils (clamped
// corners, weights times the mask) of all its kernel points in one
// branch-free loop that vectorises across points, then run a contiguous,
// vectorised loop over the group's channels per point. The common group
// widths (16 and 32 channels) are compiled with the width fixed, so that the
// accumulator stays in vector registers.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../dcnv3_common.h"

// Instruction sets, per platform (the numerics are the same code everywhere):
//  - x86-64, GCC or Clang (Linux, macOS x86): the hot loops are compiled three
//    times, for the baseline ISA, for AVX2+FMA and for AVX-512, through
//    target(...) attributes, and chosen at run time. The bodies are
//    always-inline templates, so the wide-ISA code exists only inside the
//    target(...) wrappers and no shared inline function is ever compiled for
//    them (no ODR hazard).
//  - MSVC ABI (cl.exe, clang-cl; Windows): one baseline build (SSE2 on x64,
//    auto-vectorised). MSVC has no per-function target attribute, and a whole
//    file compiled with /arch:AVX2 would fault on CPUs without AVX2.
//  - AArch64 (Linux, macOS) and anything else: one build for the baseline ISA;
//    on AArch64 that includes the NEON (ASIMD) vector unit, which every
//    AArch64 CPU has. No x86 code path is compiled there.
#if defined(_MSC_VER)
#define DCNV3_INLINE __forceinline
#define DCNV3_RESTRICT __restrict
#elif defined(__GNUC__) || defined(__clang__)
#define DCNV3_INLINE inline __attribute__((always_inline))
#define DCNV3_RESTRICT __restrict__
#if defined(__x86_64__)
#define DCNV3_X86_DISPATCH 1
#define DCNV3_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define DCNV3_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")))
#endif
#else
#define DCNV3_INLINE inline
#define DCNV3_RESTRICT
#endif

namespace dcnv3 {
namespace {

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The widest usable ISA; TIMM_INTERNIMAGE_DCNV3_CPU_ISA=baseline|avx2 caps it.
Isa cpu_isa() {
#if defined(DCNV3_X86_DISPATCH)
  static const Isa isa = [] {
    __builtin_cpu_init();
    Isa best = Isa::kBaseline;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      best = Isa::kAvx2;
      if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
        best = Isa::kAvx512;
      }
    }
    const char* cap = std::getenv("TIMM_INTERNIMAGE_DCNV3_CPU_ISA");
    if (cap != nullptr && std::strcmp(cap, "baseline") == 0) {
      return Isa::kBaseline;
    }
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0) {
      return std::min(best, Isa::kAvx2);
    }
    return best;
  }();
  return isa;
#else
  return Isa::kBaseline;
#endif
}

constexpr int64_t kGrainWork = 1 << 14;  // scalar multiply-adds per task, roughly
constexpr double kMaxBufferBytes = 256.0 * (1 << 20);  // private grad_input buffers, all threads

int64_t grain_for(int64_t per_item) {
  return std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, per_item));
}

// exp() of softmax arguments (x <= 0 after the max is subtracted). float:
// 2^n * exp(r), |r| <= ln(2)/2, with the Cephes expf polynomial (relative
// error about 1e-7), branch-free so that it vectorises; NaN stays NaN.
// double: the library exp.
template <typename T>
DCNV3_INLINE T softmax_exp(T x) {
  return std::exp(x);
}

template <>
DCNV3_INLINE float softmax_exp<float>(float x) {
  const float clamped = x < -87.0f ? -87.0f : x;  // exp(-87) is still a normal float
  const float n = std::floor(clamped * 1.44269504088896341f + 0.5f);
  float r = clamped - n * 0.693359375f;  // ln 2 split in two for an exact product
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n == n ? n : 0.0f) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

// prob = per-group softmax over the P logits of each of `groups` groups
// (or the mask as given when it holds weights, not logits). `shifted` is
// scratch of the same size.
template <typename scalar_t, typename acc_t>
DCNV3_INLINE void point_weights(
    const scalar_t* DCNV3_RESTRICT mask,
    int64_t groups,
    int64_t P,
    bool logits,
    acc_t* DCNV3_RESTRICT prob,
    acc_t* DCNV3_RESTRICT shifted) {
  const int64_t n = groups * P;
  if (!logits) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      prob[j] = static_cast<acc_t>(mask[j]);
    }
    return;
  }
  for (int64_t gi = 0; gi < groups; ++gi) {
    const scalar_t* m = mask + gi * P;
    acc_t mx = static_cast<acc_t>(m[0]);
    for (int64_t p = 1; p < P; ++p) {
      const acc_t v = static_cast<acc_t>(m[p]);
      mx = v > mx ? v : mx;
    }
    for (int64_t p = 0; p < P; ++p) {
      shifted[gi * P + p] = static_cast<acc_t>(m[p]) - mx;
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    prob[j] = softmax_exp(shifted[j]);
  }
  for (int64_t gi = 0; gi < groups; ++gi) {
    acc_t* e = prob + gi * P;
    acc_t sum = acc_t(0);
    for (int64_t p = 0; p < P; ++p) {
      sum += e[p];
    }
    const acc_t inv = acc_t(1) / sum;
    for (int64_t p = 0; p < P; ++p) {
      e[p] *= inv;
    }
  }
}

// Base-grid displacements of the points of `groups` groups: (kx, ky)[g*P+p].
template <typename acc_t>
void kernel_grid_table(const Geometry& g, int64_t groups, std::vector<acc_t>& kx, std::vector<acc_t>& ky) {
  kx.resize(groups * g.P);
  ky.resize(groups * g.P);
  for (int64_t j = 0; j < groups * g.P; ++j) {
    kernel_grid<acc_t>(g, j % g.P, kx[j], ky[j]);
  }
}

constexpr int32_t kInterior = 1;
constexpr int32_t kCounts = 2;

// Per-output-pixel point data in structure-of-arrays layout (vectorisable).
template <typename acc_t>
struct PointArrays {
  explicit PointArrays(int64_t n) : real(14 * n), index(5 * n), n(n) {}
  acc_t* prob() { return real.data(); }
  acc_t* shifted() { return real.data() + n; }
  acc_t* weight(int k) { return real.data() + (2 + k) * n; }
  acc_t* weight_dx(int k) { return real.data() + (6 + k) * n; }
  acc_t* weight_dy(int k) { return real.data() + (10 + k) * n; }
  int32_t* coord(int k) { return index.data() + k * n; }  // x0, x1, y0, y1
  int32_t* flags() { return index.data() + 4 * n; }  // kInterior | kCounts
  std::vector<acc_t> real;
  std::vector<int32_t> index;
  int64_t n;
};

// Stencils of the `count` points of output pixel (ho, wo) whose offsets start
// at offp, in one loop vectorised across points. kBackward: raw weights plus
// derivatives and flags; otherwise weights times the sample weight.
template <typename scalar_t, bool kBackward>
DCNV3_INLINE void compute_stencils(
    const Geometry& g,
    int64_t ho,
    int64_t wo,
    const opmath_t<scalar_t>* DCNV3_RESTRICT kx,
    const opmath_t<scalar_t>* DCNV3_RESTRICT ky,
    const scalar_t* DCNV3_RESTRICT offp,
    int64_t count,
    PointArrays<opmath_t<scalar_t>>& pts) {
  using acc_t = opmath_t<scalar_t>;
  const int32_t H = static_cast<int32_t>(g.H);
  const int32_t W = static_cast<int32_t>(g.W);
  const acc_t* DCNV3_RESTRICT prob = pts.prob();
  acc_t* DCNV3_RESTRICT w0 = pts.weight(0);
  acc_t* DCNV3_RESTRICT w1 = pts.weight(1);
  acc_t* DCNV3_RESTRICT w2 = pts.weight(2);
  acc_t* DCNV3_RESTRICT w3 = pts.weight(3);
  acc_t* DCNV3_RESTRICT wx0 = pts.weight_dx(0);
  acc_t* DCNV3_RESTRICT wx1 = pts.weight_dx(1);
  acc_t* DCNV3_RESTRICT wx2 = pts.weight_dx(2);
  acc_t* DCNV3_RESTRICT wx3 = pts.weight_dx(3);
  acc_t* DCNV3_RESTRICT wy0 = pts.weight_dy(0);
  acc_t* DCNV3_RESTRICT wy1 = pts.weight_dy(1);
  acc_t* DCNV3_RESTRICT wy2 = pts.weight_dy(2);
  acc_t* DCNV3_RESTRICT wy3 = pts.weight_dy(3);
  int32_t* DCNV3_RESTRICT cx0 = pts.coord(0);
  int32_t* DCNV3_RESTRICT cx1 = pts.coord(1);
  int32_t* DCNV3_RESTRICT cy0 = pts.coord(2);
  int32_t* DCNV3_RESTRICT cy1 = pts.coord(3);
  int32_t* DCNV3_RESTRICT flags = pts.flags();
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) {
    acc_t px, py;
    sample_position<acc_t>(
        g, ho, wo, kx[j], ky[j], static_cast<acc_t>(offp[2 * j]), static_cast<acc_t>(offp[2 * j + 1]), px, py);
    const Stencil<acc_t> st = make_stencil<acc_t>(px, py, H, W);
    const acc_t m = kBackward ? acc_t(1) : sample_weight(st, prob[j]);
    w0[j] = m * st.w[0];
    w1[j] = m * st.w[1];
    w2[j] = m * st.w[2];
    w3[j] = m * st.w[3];
    cx0[j] = st.x0;
    cx1[j] = st.x1;
    cy0[j] = st.y0;
    cy1[j] = st.y1;
    if (kBackward) {
      wx0[j] = st.wx[0];
      wx1[j] = st.wx[1];
      wx2[j] = st.wx[2];
      wx3[j] = st.wx[3];
      wy0[j] = st.wy[0];
      wy1[j] = st.wy[1];
      wy2[j] = st.wy[2];
      wy3[j] = st.wy[3];
      flags[j] = (st.interior ? kInterior : 0) | (st.counts ? kCounts : 0);
    }
  }
}

// Scratch for prepare_points: the offsets and weights of one pixel's groups
// gathered into DCNv3's layout, for layouts where the groups do not follow
// each other (DCNv4's packed offset_mask); empty otherwise.
template <typename scalar_t>
std::vector<scalar_t> gather_scratch(const Geometry& g, int64_t groups) {
  return std::vector<scalar_t>(g.groups_packed() ? 0 : 3 * groups * g.P);
}

// Point weights and stencils of the points of groups g_begin..g_begin+groups-1
// of output pixel pos = (n, ho, wo), read through the geometry's addressing,
// in one run of groups*P points vectorised across points: DCNv3's layout is
// read in place, any other (DCNv4's packed offset_mask) is first gathered
// into `scratch` in DCNv3's layout. Point j of pts is point j % P of group
// g_begin + j / P.
template <typename scalar_t, bool kBackward>
DCNV3_INLINE void prepare_points(
    const Geometry& g,
    int64_t pos,
    int64_t ho,
    int64_t wo,
    int64_t g_begin,
    int64_t groups,
    const opmath_t<scalar_t>* kx,
    const opmath_t<scalar_t>* ky,
    const scalar_t* off,
    const scalar_t* mask,
    scalar_t* scratch,
    PointArrays<opmath_t<scalar_t>>& pts) {
  using acc_t = opmath_t<scalar_t>;
  const scalar_t* offp = off + pos * g.off_pixel + g_begin * g.off_group;
  const scalar_t* mp = mask + pos * g.mask_pixel + g_begin * g.mask_group;
  const int64_t P = g.P;
  if (!g.groups_packed()) {
    scalar_t* gathered_off = scratch;
    scalar_t* gathered_mask = scratch + 2 * groups * P;
    for (int64_t lg = 0; lg < groups; ++lg) {
      std::memcpy(gathered_off + 2 * lg * P, offp + lg * g.off_group, 2 * P * sizeof(scalar_t));
      std::memcpy(gathered_mask + lg * P, mp + lg * g.mask_group, P * sizeof(scalar_t));
    }
    offp = gathered_off;
    mp = gathered_mask;
  }
  point_weights<scalar_t, acc_t>(mp, groups, P, g.mask_logits, pts.prob(), pts.shifted());
  compute_stencils<scalar_t, kBackward>(g, ho, wo, kx, ky, offp, groups * P, pts);
}

// Point j of pts as a Stencil (for the shared gradient math).
template <typename acc_t>
DCNV3_INLINE Stencil<acc_t> stencil_at(PointArrays<acc_t>& pts, int64_t j) {
  Stencil<acc_t> st;
  st.x0 = pts.coord(0)[j];
  st.x1 = pts.coord(1)[j];
  st.y0 = pts.coord(2)[j];
  st.y1 = pts.coord(3)[j];
  for (int k = 0; k < 4; ++k) {
    st.w[k] = pts.weight(k)[j];
    st.wx[k] = pts.weight_dx(k)[j];
    st.wy[k] = pts.weight_dy(k)[j];
  }
  st.interior = (pts.flags()[j] & kInterior) != 0;
  st.counts = (pts.flags()[j] & kCounts) != 0;
  return st;
}

// acc[c] += a0*v0[c] + a1*v1[c] + a2*v2[c] + a3*v3[c] over the group's C
// channels (kC when fixed at compile time).
template <typename acc_t, typename scalar_t, int kC>
DCNV3_INLINE void accumulate_point(
    acc_t* DCNV3_RESTRICT acc,
    const scalar_t* DCNV3_RESTRICT v0,
    const scalar_t* DCNV3_RESTRICT v1,
    const scalar_t* DCNV3_RESTRICT v2,
    const scalar_t* DCNV3_RESTRICT v3,
    acc_t a0,
    acc_t a1,
    acc_t a2,
    acc_t a3,
    int64_t C_runtime) {
  const int64_t C = kC > 0 ? kC : C_runtime;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    acc[c] += a0 * static_cast<acc_t>(v0[c]) + a1 * static_cast<acc_t>(v1[c]) + a2 * static_cast<acc_t>(v2[c]) +
        a3 * static_cast<acc_t>(v3[c]);
  }
}

template <typename acc_t, typename scalar_t, int kC>
DCNV3_INLINE void store_channels(const acc_t* DCNV3_RESTRICT acc, scalar_t* DCNV3_RESTRICT out, int64_t C_runtime) {
  const int64_t C = kC > 0 ? kC : C_runtime;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    out[c] = static_cast<scalar_t>(acc[c]);
  }
}

template <typename scalar_t>
struct ForwardArgs {
  using acc_t = opmath_t<scalar_t>;
  const Geometry* g;
  const scalar_t* x;
  const scalar_t* off;
  const scalar_t* mask;
  scalar_t* out;
  const acc_t* kx;  // per point of all groups
  const acc_t* ky;
};

// Forward of output pixels [begin, end); kC is the group width, or 0 when
// only known at run time.
template <typename scalar_t, int kC>
DCNV3_INLINE void forward_range(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = opmath_t<scalar_t>;
  const Geometry& g = *a.g;
  const int64_t C = kC > 0 ? kC : g.C;
  const int64_t GC = g.G * C;
  const int64_t row = g.W * GC;
  const int64_t GP = g.G * g.P;
  PointArrays<acc_t> pts(GP);
  std::vector<scalar_t> scratch = gather_scratch<scalar_t>(g, g.G);
  std::vector<acc_t> acc_buf(kC > 0 ? 0 : C);
  const acc_t* w0 = pts.weight(0);
  const acc_t* w1 = pts.weight(1);
  const acc_t* w2 = pts.weight(2);
  const acc_t* w3 = pts.weight(3);
  const int32_t* cx0 = pts.coord(0);
  const int32_t* cx1 = pts.coord(1);
  const int32_t* cy0 = pts.coord(2);
  const int32_t* cy1 = pts.coord(3);
  for (int64_t pos = begin; pos < end; ++pos) {
    const int64_t wo = pos % g.Wo;
    const int64_t ho = (pos / g.Wo) % g.Ho;
    const int64_t n = pos / (g.Wo * g.Ho);
    prepare_points<scalar_t, false>(g, pos, ho, wo, 0, g.G, a.kx, a.ky, a.off, a.mask, scratch.data(), pts);
    const scalar_t* xn = a.x + n * g.H * row;
    for (int64_t gi = 0; gi < g.G; ++gi) {
      const scalar_t* xg = xn + gi * C;
      scalar_t* o = a.out + pos * GC + gi * C;
      const int64_t j0 = gi * g.P;
      acc_t acc_fixed[kC > 0 ? kC : 1];
      acc_t* acc = kC > 0 ? acc_fixed : acc_buf.data();
      std::fill(acc, acc + C, acc_t(0));
      for (int64_t j = j0; j < j0 + g.P; ++j) {
        int64_t off[4];
        corner_offsets(cx0[j], cx1[j], cy0[j], cy1[j], row, GC, off);
        accumulate_point<acc_t, scalar_t, kC>(
            acc, xg + off[0], xg + off[1], xg + off[2], xg + off[3], w0[j], w1[j], w2[j], w3[j], C);
      }
      store_channels<acc_t, scalar_t, kC>(acc, o, C);
    }
  }
}

template <typename scalar_t, int kC>
void forward_range_baseline(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  forward_range<scalar_t, kC>(a, begin, end);
}
#if defined(DCNV3_X86_DISPATCH)
template <typename scalar_t, int kC>
DCNV3_TARGET_AVX2 void forward_range_avx2(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  forward_range<scalar_t, kC>(a, begin, end);
}
template <typename scalar_t, int kC>
DCNV3_TARGET_AVX512 void forward_range_avx512(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  forward_range<scalar_t, kC>(a, begin, end);
}
#endif

template <typename Args>
using RangeFn = void (*)(const Args&, int64_t, int64_t);

// The range function for this CPU's ISA and the group width C: 16 and 32
// (all InternImage variants) are compiled with C fixed.
#if defined(DCNV3_X86_DISPATCH)
#define DCNV3_PICK_ISA(name, kC)                 \
  switch (cpu_isa()) {                           \
    case Isa::kAvx512:                           \
      return &name##_avx512<scalar_t, kC>;       \
    case Isa::kAvx2:                             \
      return &name##_avx2<scalar_t, kC>;         \
    default:                                     \
      return &name##_baseline<scalar_t, kC>;     \
  }
#else
#define DCNV3_PICK_ISA(name, kC) return &name##_baseline<scalar_t, kC>;
#endif

template <typename scalar_t, int kC>
RangeFn<ForwardArgs<scalar_t>> pick_forward_isa() {
  DCNV3_PICK_ISA(forward_range, kC)
}

template <typename scalar_t>
RangeFn<ForwardArgs<scalar_t>> pick_forward(int64_t C) {
  return C == 16 ? pick_forward_isa<scalar_t, 16>()
                 : (C == 32 ? pick_forward_isa<scalar_t, 32>() : pick_forward_isa<scalar_t, 0>());
}

template <typename scalar_t>
void forward_kernel(const Geometry& g, const scalar_t* x, const scalar_t* off, const scalar_t* mask, scalar_t* out) {
  using acc_t = opmath_t<scalar_t>;
  std::vector<acc_t> kx, ky;
  kernel_grid_table(g, g.G, kx, ky);
  const ForwardArgs<scalar_t> args{&g, x, off, mask, out, kx.data(), ky.data()};
  const RangeFn<ForwardArgs<scalar_t>> range_fn = pick_forward<scalar_t>(g.C);
  torch::stable::parallel_for(0, g.positions(), grain_for(g.G * g.P * (g.C * 4 + 24)), [&](int64_t begin, int64_t end) {
    range_fn(args, begin, end);
  });
}

template <typename scalar_t>
struct BackwardArgs {
  using acc_t = opmath_t<scalar_t>;
  const Geometry* g;
  const scalar_t* grad_out;
  const scalar_t* x;
  const scalar_t* off;
  const scalar_t* mask;
  scalar_t* grad_off;
  scalar_t* grad_mask;
  const acc_t* kx;  // per point of all groups
  const acc_t* ky;
};

// Sum of the kWidth values of p in pairwise (tree) order: p[c] + p[c + kWidth/2]
// first. Each step has a width fixed at compile time, so that the compilers
// keep the halves in registers.
template <typename acc_t, int kWidth>
DCNV3_INLINE acc_t tree_sum(const acc_t* DCNV3_RESTRICT p) {
  if constexpr (kWidth == 1) {
    return p[0];
  } else {
    acc_t half[kWidth / 2];
#pragma omp simd
    for (int c = 0; c < kWidth / 2; ++c) {
      half[c] = p[c] + p[c + kWidth / 2];
    }
    return tree_sum<acc_t, kWidth / 2>(half);
  }
}

// d[k] = sum_c go[c] * v_k[c] over the four corner rows, and, when kScatter,
// gin_k[c] += mw[k] * go[c]. Only called with kScatter when the four corners
// are distinct pixels (restrict).
template <typename acc_t, typename scalar_t, int kC, bool kScatter>
DCNV3_INLINE void backward_channels(
    const scalar_t* DCNV3_RESTRICT go,
    const scalar_t* DCNV3_RESTRICT v0,
    const scalar_t* DCNV3_RESTRICT v1,
    const scalar_t* DCNV3_RESTRICT v2,
    const scalar_t* DCNV3_RESTRICT v3,
    acc_t* DCNV3_RESTRICT d0,
    acc_t* DCNV3_RESTRICT d1,
    acc_t* DCNV3_RESTRICT d2,
    acc_t* DCNV3_RESTRICT d3,
    const acc_t mw[4],
    int64_t C_runtime,
    acc_t d[4]) {
  const int64_t C = kC > 0 ? kC : C_runtime;
  const acc_t m0 = mw[0], m1 = mw[1], m2 = mw[2], m3 = mw[3];
  if constexpr (kC > 0) {
    // Fixed width: products in registers, then pairwise (tree) sums; the
    // compilers otherwise reduce such short loops one lane at a time.
    acc_t p0[kC], p1[kC], p2[kC], p3[kC];
#pragma omp simd
    for (int c = 0; c < kC; ++c) {
      const acc_t gc = static_cast<acc_t>(go[c]);
      p0[c] = gc * static_cast<acc_t>(v0[c]);
      p1[c] = gc * static_cast<acc_t>(v1[c]);
      p2[c] = gc * static_cast<acc_t>(v2[c]);
      p3[c] = gc * static_cast<acc_t>(v3[c]);
      if (kScatter) {
        d0[c] += m0 * gc;
        d1[c] += m1 * gc;
        d2[c] += m2 * gc;
        d3[c] += m3 * gc;
      }
    }
    d[0] = tree_sum<acc_t, kC>(p0);
    d[1] = tree_sum<acc_t, kC>(p1);
    d[2] = tree_sum<acc_t, kC>(p2);
    d[3] = tree_sum<acc_t, kC>(p3);
    return;
  }
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t c = 0; c < C; ++c) {
    const acc_t gc = static_cast<acc_t>(go[c]);
    s0 += gc * static_cast<acc_t>(v0[c]);
    s1 += gc * static_cast<acc_t>(v1[c]);
    s2 += gc * static_cast<acc_t>(v2[c]);
    s3 += gc * static_cast<acc_t>(v3[c]);
    if (kScatter) {
      d0[c] += m0 * gc;
      d1[c] += m1 * gc;
      d2[c] += m2 * gc;
      d3[c] += m3 * gc;
    }
  }
  d[0] = s0;
  d[1] = s1;
  d[2] = s2;
  d[3] = s3;
}

// Backward of the output pixels [hw_begin, hw_end) of batch element n, groups
// [g_begin, g_begin + g_count). grad_input contributions go to gin (acc_t,
// laid out like the input, pointing at channel 0 of batch element n); the
// caller makes sure no other thread writes the same groups of gin at the same
// time. The points of all the groups of a pixel are prepared in one pass, as
// in the forward.
template <typename scalar_t, int kC>
DCNV3_INLINE void backward_range(
    const BackwardArgs<scalar_t>& a,
    int64_t n,
    int64_t g_begin,
    int64_t g_count,
    int64_t hw_begin,
    int64_t hw_end,
    opmath_t<scalar_t>* gin) {
  using acc_t = opmath_t<scalar_t>;
  const Geometry& g = *a.g;
  const int64_t C = kC > 0 ? kC : g.C;
  const int64_t GC = g.G * C;
  const int64_t row = g.W * GC;
  const int64_t P = g.P;
  const int64_t count = g_count * P;
  const scalar_t* xn = a.x + n * g.H * row;
  PointArrays<acc_t> pts(count);
  std::vector<scalar_t> scratch = gather_scratch<scalar_t>(g, g_count);
  std::vector<acc_t> gm(count);
  const acc_t* prob = pts.prob();
  for (int64_t hw = hw_begin; hw < hw_end; ++hw) {
    const int64_t pos = n * g.Ho * g.Wo + hw;
    const int64_t wo = hw % g.Wo;
    const int64_t ho = hw / g.Wo;
    prepare_points<scalar_t, true>(g, pos, ho, wo, g_begin, g_count, a.kx, a.ky, a.off, a.mask, scratch.data(), pts);
    for (int64_t lg = 0; lg < g_count; ++lg) {
      const int64_t gi = g_begin + lg;
      scalar_t* grad_off = a.grad_off + pos * g.off_pixel + gi * g.off_group;  // this group's offset pairs
      const scalar_t* go = a.grad_out + pos * GC + gi * C;
      const scalar_t* xg = xn + gi * C;
      acc_t* ging = gin + gi * C;
      for (int64_t j = lg * P; j < (lg + 1) * P; ++j) {
        const Stencil<acc_t> s = stencil_at(pts, j);
        const acc_t m = sample_weight(s, prob[j]);
        int64_t off[4];
        stencil_offsets(s, row, GC, off);
        const acc_t mw[4] = {m * s.w[0], m * s.w[1], m * s.w[2], m * s.w[3]};
        acc_t d[4];
        if (s.interior) {
          backward_channels<acc_t, scalar_t, kC, true>(
              go, xg + off[0], xg + off[1], xg + off[2], xg + off[3], ging + off[0], ging + off[1], ging + off[2],
              ging + off[3], mw, C, d);
        } else {
          // Clamped corners may coincide: dot products first, then one corner at a time.
          backward_channels<acc_t, scalar_t, kC, false>(
              go, xg + off[0], xg + off[1], xg + off[2], xg + off[3], nullptr, nullptr, nullptr, nullptr, mw, C, d);
          for (int k = 0; k < 4; ++k) {
            if (mw[k] == acc_t(0)) {
              continue;
            }
            acc_t* DCNV3_RESTRICT dst = ging + off[k];
            const acc_t wk = mw[k];
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              dst[c] += wk * static_cast<acc_t>(go[c]);
            }
          }
        }
        // The sampled value is linear in the corner values, so the stencil
        // applied to the corner dot products gives sum_c go*value and the
        // position derivatives.
        acc_t s_v, s_x, s_y;
        stencil_value_grad<acc_t>(s, d, s_v, s_x, s_y);
        acc_t gox, goy;
        offset_grad<acc_t>(g, m * s_x, m * s_y, gox, goy);
        grad_off[2 * (j - lg * P)] = static_cast<scalar_t>(gox);
        grad_off[2 * (j - lg * P) + 1] = static_cast<scalar_t>(goy);
        gm[j] = s_v;
      }
      if (g.mask_logits) {
        softmax_backward_inplace(prob + lg * P, gm.data() + lg * P, P);
      }
      scalar_t* grad_mask = a.grad_mask + pos * g.mask_pixel + gi * g.mask_group;
      for (int64_t p = 0; p < P; ++p) {
        grad_mask[p] = static_cast<scalar_t>(gm[lg * P + p]);
      }
    }
  }
}

template <typename scalar_t>
using BackwardRangeFn =
    void (*)(const BackwardArgs<scalar_t>&, int64_t, int64_t, int64_t, int64_t, int64_t, opmath_t<scalar_t>*);

#define DCNV3_BACKWARD_RANGE_ARGS \
  const BackwardArgs<scalar_t>&a, int64_t n, int64_t g_begin, int64_t g_count, int64_t hw_begin, int64_t hw_end, \
      opmath_t<scalar_t>*gin
template <typename scalar_t, int kC>
void backward_range_baseline(DCNV3_BACKWARD_RANGE_ARGS) {
  backward_range<scalar_t, kC>(a, n, g_begin, g_count, hw_begin, hw_end, gin);
}
#if defined(DCNV3_X86_DISPATCH)
template <typename scalar_t, int kC>
DCNV3_TARGET_AVX2 void backward_range_avx2(DCNV3_BACKWARD_RANGE_ARGS) {
  backward_range<scalar_t, kC>(a, n, g_begin, g_count, hw_begin, hw_end, gin);
}
template <typename scalar_t, int kC>
DCNV3_TARGET_AVX512 void backward_range_avx512(DCNV3_BACKWARD_RANGE_ARGS) {
  backward_range<scalar_t, kC>(a, n, g_begin, g_count, hw_begin, hw_end, gin);
}
#endif

template <typename scalar_t, int kC>
BackwardRangeFn<scalar_t> pick_backward_isa() {
  DCNV3_PICK_ISA(backward_range, kC)
}

template <typename scalar_t>
BackwardRangeFn<scalar_t> pick_backward(int64_t C) {
  return C == 16 ? pick_backward_isa<scalar_t, 16>()
                 : (C == 32 ? pick_backward_isa<scalar_t, 32>() : pick_backward_isa<scalar_t, 0>());
}

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
  const int64_t threads = static_cast<int64_t>(torch::stable::get_num_threads());
  const int64_t work_per_pixel = g.P * g.C * 8;
  std::vector<acc_t> kx, ky;
  kernel_grid_table(g, g.G, kx, ky);
  const BackwardArgs<scalar_t> args{&g, grad_out, x, off, mask, grad_off, grad_mask, kx.data(), ky.data()};
  const BackwardRangeFn<scalar_t> range_fn = pick_backward<scalar_t>(g.C);
  // Private-buffer strategy only when there are fewer (batch element, group)
  // slices than threads and the buffers stay small; otherwise one thread per
  // slice of grad_input, each slice as many whole groups as the thread count allows.
  const int64_t chunks = std::min<int64_t>(threads, std::max<int64_t>(1, HWo / 16));
  const int64_t total = g.N * in_plane;
  const bool small_buffers = static_cast<double>(chunks) * static_cast<double>(total) * sizeof(acc_t) <= kMaxBufferBytes;
  if (g.N * g.G >= threads || g.N * g.G * HWo * work_per_pixel < kGrainWork || !small_buffers) {
    int64_t block = g.G;  // groups per task
    while (block % 2 == 0 && g.N * (g.G / block) < threads) {
      block /= 2;
    }
    if (g.N * (g.G / block) < threads) {
      block = 1;
    }
    const int64_t blocks = g.G / block;
    torch::stable::parallel_for(0, g.N * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / blocks;
        range_fn(args, n, (t % blocks) * block, block, 0, HWo, gin + n * in_plane);
      }
    });
    return;
  }
  // Few (batch element, group) pairs: split the output pixels into chunks,
  // each accumulating into a private grad_input buffer, then reduce.
  std::vector<std::vector<acc_t>> bufs(chunks);
  torch::stable::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      std::vector<acc_t>& buf = bufs[k];
      buf.assign(total, acc_t(0));
      const int64_t lo = HWo * k / chunks;
      const int64_t hi = HWo * (k + 1) / chunks;
      for (int64_t n = 0; n < g.N; ++n) {
        range_fn(args, n, 0, g.G, lo, hi, buf.data() + n * in_plane);
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

// Forward into a new output: the offsets are read from `offset`, the point
// weights from `mask` from element mask_shift on, both through g's addressing.
Tensor run_forward(const char* name, const Geometry& g, const Tensor& input, const Tensor& offset, const Tensor& mask,
                   int64_t mask_shift) {
  Tensor out = torch::stable::new_empty(input, output_shape(g));
  dispatch_floating(input.scalar_type(), name, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    forward_kernel<scalar_t>(
        g, input.const_data_ptr<scalar_t>(), offset.const_data_ptr<scalar_t>(),
        mask.const_data_ptr<scalar_t>() + mask_shift, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

// Backward into grad_input (zeroed for float/double) and the offset and
// weight gradients, addressed like the offsets and weights.
void run_backward(
    const char* name,
    const Geometry& g,
    const Tensor& grad_output,
    const Tensor& input,
    const Tensor& offset,
    const Tensor& mask,
    int64_t mask_shift,
    Tensor& grad_input,
    Tensor& grad_offset,
    Tensor& grad_mask) {
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
        offset.const_data_ptr<scalar_t>(), mask.const_data_ptr<scalar_t>() + mask_shift, gin,
        grad_offset.mutable_data_ptr<scalar_t>(), grad_mask.mutable_data_ptr<scalar_t>() + mask_shift);
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      scalar_t* dst = grad_input.mutable_data_ptr<scalar_t>();
      torch::stable::parallel_for(0, grad_input.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          dst[i] = static_cast<scalar_t>(gin[i]);
        }
      });
    }
  });
}

Tensor forward_impl(
    const char* name, const Geometry& g, const Tensor& input_, const Tensor& offset_, const Tensor& mask_) {
  const Tensor input = torch::stable::contiguous(input_);
  const Tensor offset = torch::stable::contiguous(offset_);
  const Tensor mask = torch::stable::contiguous(mask_);
  return run_forward(name, g, input, offset, mask, 0);
}

std::tuple<Tensor, Tensor, Tensor> backward_impl(
    const char* name,
    const Geometry& g,
    const Tensor& grad_output_,
    const Tensor& input_,
    const Tensor& offset_,
    const Tensor& mask_) {
  const Tensor grad_output = torch::stable::contiguous(grad_output_);
  const Tensor input = torch::stable::contiguous(input_);
  const Tensor offset = torch::stable::contiguous(offset_);
  const Tensor mask = torch::stable::contiguous(mask_);
  auto [grad_input, grad_offset, grad_mask] = new_gradients(g, input, offset, mask);
  run_backward(name, g, grad_output, input, offset, mask, 0, grad_input, grad_offset, grad_mask);
  return std::make_tuple(grad_input, grad_offset, grad_mask);
}

// DCNv4: the same kernels, reading offsets and weights from the one packed
// offset_mask (the weights of a group 2P elements after its offsets).
Tensor packed_forward_impl(const char* name, const Geometry& g, const Tensor& input_, const Tensor& offset_mask_) {
  const Tensor input = torch::stable::contiguous(input_);
  const Tensor offset_mask = torch::stable::contiguous(offset_mask_);
  return run_forward(name, g, input, offset_mask, offset_mask, 2 * g.P);
}

std::tuple<Tensor, Tensor> packed_backward_impl(
    const char* name, const Geometry& g, const Tensor& grad_output_, const Tensor& input_, const Tensor& offset_mask_) {
  const Tensor grad_output = torch::stable::contiguous(grad_output_);
  const Tensor input = torch::stable::contiguous(input_);
  const Tensor offset_mask = torch::stable::contiguous(offset_mask_);
  auto [grad_input, grad_offset_mask] = new_packed_gradients(g, input, offset_mask);
  run_backward(
      name, g, grad_output, input, offset_mask, offset_mask, 2 * g.P, grad_input, grad_offset_mask, grad_offset_mask);
  return std::make_tuple(grad_input, grad_offset_mask);
}

}  // namespace
}  // namespace dcnv3

STABLE_TORCH_LIBRARY_IMPL(timm_internimage, CPU, m) {
  using dcnv3::Device;
  m.impl("dcnv3_forward", TORCH_BOX((&dcnv3::forward_entry<&dcnv3::forward_impl, Device::CPU, false>)));
  m.impl("dcnv3_backward", TORCH_BOX((&dcnv3::backward_entry<&dcnv3::backward_impl, Device::CPU, false>)));
  m.impl("dcnv3_softmax_forward", TORCH_BOX((&dcnv3::forward_entry<&dcnv3::forward_impl, Device::CPU, true>)));
  m.impl("dcnv3_softmax_backward", TORCH_BOX((&dcnv3::backward_entry<&dcnv3::backward_impl, Device::CPU, true>)));
  m.impl("dcnv4_forward", TORCH_BOX((&dcnv3::packed_forward_entry<&dcnv3::packed_forward_impl, Device::CPU>)));
  m.impl("dcnv4_backward", TORCH_BOX((&dcnv3::packed_backward_entry<&dcnv3::packed_backward_impl, Device::CPU>)));
}
