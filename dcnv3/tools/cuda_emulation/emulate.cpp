// Host emulation of the DCNv3 and DCNv4 CUDA launches: compiles the exact
// kernel bodies of dcnv3/csrc/cuda/dcnv3_kernels.cuh and dcnv4_kernels.cuh
// with cuda_shim.h and runs forward and backward the way the launchers in
// dcnv3_kernel.cu do, calling every (block, thread) pair of each launch in a
// seeded shuffled order.
//
//   emulate CASE_FILE RESULT_FILE
//
// CASE_FILE (written by driver.py, native byte order):
//   char[8] "DCNV3EM2"
//   int64[kHeaderInts]: dtype (0 float64, 1 float32, 2 float16, 3 bfloat16),
//     the Geometry fields N H W Ho Wo G C P kh kw sh sw ph pw dh dw half_h
//     half_w center mask_logits (as make_geometry fills them), then blocks and
//     threads (0: the launchers' blocks_for(total) and kThreads), the
//     shuffle seed, the op (0 DCNv3, 1 DCNv4), the channels M of DCNv4's
//     offset_mask, and 1 to force DCNv4's scalar channel accesses
//   float64 offset_scale
//   DCNv3: input, offset, mask, grad_output; DCNv4: input, offset_mask,
//   grad_output: raw contiguous NHWC arrays of the dtype
// RESULT_FILE: DCNv3: output, grad_input, grad_offset, grad_mask; DCNv4:
// output, grad_input, grad_offset_mask; raw, same dtype. DCNv4 appends one
// int64: 1 if the vector-access kernels ran (channels_vectorizable), else 0.
//
// Every array lives in its own exactly sized heap buffer, so that the
// sanitized build reports any out-of-bounds access by the kernels.
#include "cuda_shim.h"
// The shim must come first: the .cuh needs the scalar types and atomicAdd.
#include "../../csrc/cuda/dcnv3_kernels.cuh"
#include "../../csrc/cuda/dcnv4_kernels.cuh"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr char kMagic[8] = {'D', 'C', 'N', 'V', '3', 'E', 'M', '2'};
constexpr int kHeaderInts = 27;

struct Case {
  int64_t dtype = 0;
  dcnv3::Geometry g{};
  int64_t blocks = 0, threads = 0;
  uint64_t seed = 0;
  int64_t op = 0;  // 0 DCNv3, 1 DCNv4
  int64_t offset_mask_channels = 0;
  bool scalar_loads = false;
  const char* data = nullptr;  // start of the arrays
  size_t data_bytes = 0;
};

// Same formula as blocks_for() in dcnv3_kernel.cu (a launcher helper, not
// kernel code, so it is restated here).
unsigned int blocks_for(int64_t total) {
  const int64_t blocks = (total + dcnv3::kThreads - 1) / dcnv3::kThreads;
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), int64_t(1) << 30));
}

// Runs one launch: body() is called once per (block, thread) pair, in an
// order shuffled by rng, with the built-in index variables set.
template <typename Body>
void launch(const Case& c, int64_t total, std::mt19937_64& rng, Body&& body) {
  const unsigned int blocks = c.blocks > 0 ? static_cast<unsigned int>(c.blocks) : blocks_for(total);
  const unsigned int threads = c.threads > 0 ? static_cast<unsigned int>(c.threads) : dcnv3::kThreads;
  std::vector<std::pair<unsigned int, unsigned int>> order;
  order.reserve(static_cast<size_t>(blocks) * threads);
  for (unsigned int b = 0; b < blocks; ++b) {
    for (unsigned int t = 0; t < threads; ++t) {
      order.emplace_back(b, t);
    }
  }
  std::shuffle(order.begin(), order.end(), rng);
  gridDim.x = blocks;
  blockDim.x = threads;
  for (const auto& bt : order) {
    blockIdx.x = bt.first;
    threadIdx.x = bt.second;
    body();
  }
}

// An uninitialised buffer, as torch's new_empty gives: filled with 0xFF bytes
// (NaN for every dtype here), so that an element no thread writes shows up.
template <typename T>
std::vector<T> empty_like_torch(size_t n) {
  std::vector<T> v(n);
  std::memset(static_cast<void*>(v.data()), 0xFF, n * sizeof(T));
  return v;
}

template <typename T>
bool read_array(const Case& c, size_t& pos, size_t n, std::vector<T>& out) {
  if (pos + n * sizeof(T) > c.data_bytes) {
    return false;
  }
  out.resize(n);
  std::memcpy(static_cast<void*>(out.data()), c.data + pos, n * sizeof(T));
  pos += n * sizeof(T);
  return true;
}

template <typename T>
void write_array(std::ofstream& f, const std::vector<T>& v) {
  f.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(T)));
}

// Forward and backward of one case for scalar type T, as forward_impl and
// backward_impl launch them.
template <typename T>
int run(const Case& c, const char* result_path) {
  using acc_t = dcnv3::opmath_t<T>;
  const dcnv3::Geometry& g = c.g;
  const size_t n_in = static_cast<size_t>(g.N * g.H * g.W * g.G * g.C);
  const size_t n_out = static_cast<size_t>(g.N * g.Ho * g.Wo * g.G * g.C);
  const size_t n_mask = static_cast<size_t>(g.N * g.Ho * g.Wo * g.G * g.P);
  std::vector<T> x, off, mask, grad_out;
  size_t pos = 0;
  if (!read_array(c, pos, n_in, x) || !read_array(c, pos, 2 * n_mask, off) || !read_array(c, pos, n_mask, mask) ||
      !read_array(c, pos, n_out, grad_out) || pos != c.data_bytes) {
    std::fprintf(stderr, "emulate: array sizes do not match the geometry\n");
    return 2;
  }
  std::mt19937_64 rng(c.seed);

  // forward_impl: one thread per output element.
  std::vector<T> out = empty_like_torch<T>(n_out);
  const int64_t total_fwd = static_cast<int64_t>(n_out);
  launch(c, total_fwd, rng, [&] {
    dcnv3::forward_kernel<T>(g, x.data(), off.data(), mask.data(), out.data(), total_fwd);
  });

  // backward_impl: float/double accumulate into grad_input itself (zeroed);
  // the half types into a zeroed float buffer, then cast_kernel.
  constexpr bool kSame = std::is_same_v<T, acc_t>;
  std::vector<T> grad_in = kSame ? std::vector<T>(n_in, T(0)) : empty_like_torch<T>(n_in);
  std::vector<acc_t> gin_buf(kSame ? 0 : n_in, acc_t(0));
  acc_t* gin = nullptr;
  if constexpr (kSame) {
    gin = grad_in.data();
  } else {
    gin = gin_buf.data();
  }
  std::vector<T> grad_off = empty_like_torch<T>(2 * n_mask);
  std::vector<T> grad_mask = empty_like_torch<T>(n_mask);
  const int64_t total_bwd = g.positions() * g.G;
  launch(c, total_bwd, rng, [&] {
    if (g.mask_logits) {
      dcnv3::backward_kernel<T, true>(
          g, grad_out.data(), x.data(), off.data(), mask.data(), gin, grad_off.data(), grad_mask.data(), total_bwd);
    } else {
      dcnv3::backward_kernel<T, false>(
          g, grad_out.data(), x.data(), off.data(), mask.data(), gin, grad_off.data(), grad_mask.data(), total_bwd);
    }
  });
  if constexpr (!kSame) {
    const int64_t total_cast = static_cast<int64_t>(n_in);
    launch(c, total_cast, rng, [&] { dcnv3::cast_kernel<T, acc_t>(gin, grad_in.data(), total_cast); });
  }

  std::ofstream f(result_path, std::ios::binary);
  write_array(f, out);
  write_array(f, grad_in);
  write_array(f, grad_off);
  write_array(f, grad_mask);
  return f.good() ? 0 : 2;
}

// Forward and backward of one DCNv4 case for scalar type T, as
// packed_forward_impl and packed_backward_impl launch them.
template <typename T>
int run_packed(const Case& c, const char* result_path) {
  using acc_t = dcnv3::opmath_t<T>;
  constexpr int kVec = dcnv3::vector_channels<T>();
  const dcnv3::Geometry& g = c.g;
  const size_t n_in = static_cast<size_t>(g.N * g.H * g.W * g.G * g.C);
  const size_t n_out = static_cast<size_t>(g.N * g.Ho * g.Wo * g.G * g.C);
  const size_t n_om = static_cast<size_t>(g.N * g.Ho * g.Wo * c.offset_mask_channels);
  std::vector<T> x, om, grad_out;
  size_t pos = 0;
  if (!read_array(c, pos, n_in, x) || !read_array(c, pos, n_om, om) || !read_array(c, pos, n_out, grad_out) ||
      pos != c.data_bytes) {
    std::fprintf(stderr, "emulate: array sizes do not match the geometry\n");
    return 2;
  }
  std::mt19937_64 rng(c.seed);
  const T* weights = om.data() + 2 * g.P;

  std::vector<T> out = empty_like_torch<T>(n_out);
  const bool fwd_vec = !c.scalar_loads && dcnv3::channels_vectorizable<T>(g, x.data(), out.data());
  const int64_t total_fwd = g.positions() * g.G * ((g.C + kVec - 1) / kVec);
  launch(c, total_fwd, rng, [&] {
    if (fwd_vec) {
      dcnv3::packed_forward_kernel<T, true>(g, x.data(), om.data(), weights, out.data(), total_fwd);
    } else {
      dcnv3::packed_forward_kernel<T, false>(g, x.data(), om.data(), weights, out.data(), total_fwd);
    }
  });

  // new_packed_gradients: grad_offset_mask zeroed (its padding stays 0).
  constexpr bool kSame = std::is_same_v<T, acc_t>;
  std::vector<T> grad_in = kSame ? std::vector<T>(n_in, T(0)) : empty_like_torch<T>(n_in);
  std::vector<acc_t> gin_buf(kSame ? 0 : n_in, acc_t(0));
  acc_t* gin = nullptr;
  if constexpr (kSame) {
    gin = grad_in.data();
  } else {
    gin = gin_buf.data();
  }
  std::vector<T> grad_om(n_om, T(0));
  T* grad_weights = grad_om.data() + 2 * g.P;
  const bool bwd_vec = !c.scalar_loads && dcnv3::channels_vectorizable<T>(g, grad_out.data(), x.data());
  const int64_t total_bwd = g.positions() * g.G;
  launch(c, total_bwd, rng, [&] {
    const T* go = grad_out.data();
    if (bwd_vec && g.mask_logits) {
      dcnv3::packed_backward_kernel<T, true, true>(
          g, go, x.data(), om.data(), weights, gin, grad_om.data(), grad_weights, total_bwd);
    } else if (bwd_vec) {
      dcnv3::packed_backward_kernel<T, true, false>(
          g, go, x.data(), om.data(), weights, gin, grad_om.data(), grad_weights, total_bwd);
    } else if (g.mask_logits) {
      dcnv3::packed_backward_kernel<T, false, true>(
          g, go, x.data(), om.data(), weights, gin, grad_om.data(), grad_weights, total_bwd);
    } else {
      dcnv3::packed_backward_kernel<T, false, false>(
          g, go, x.data(), om.data(), weights, gin, grad_om.data(), grad_weights, total_bwd);
    }
  });
  if constexpr (!kSame) {
    const int64_t total_cast = static_cast<int64_t>(n_in);
    launch(c, total_cast, rng, [&] { dcnv3::cast_kernel<T, acc_t>(gin, grad_in.data(), total_cast); });
  }

  std::ofstream f(result_path, std::ios::binary);
  write_array(f, out);
  write_array(f, grad_in);
  write_array(f, grad_om);
  const std::vector<int64_t> vectorized = {fwd_vec && bwd_vec ? 1 : 0};
  write_array(f, vectorized);
  return f.good() ? 0 : 2;
}

template <typename T>
int run_case(const Case& c, const char* result_path) {
  return c.op == 1 ? run_packed<T>(c, result_path) : run<T>(c, result_path);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: emulate CASE_FILE RESULT_FILE\n");
    return 2;
  }
  std::ifstream in(argv[1], std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t header = sizeof(kMagic) + kHeaderInts * sizeof(int64_t) + sizeof(double);
  if (bytes.size() < header || std::memcmp(bytes.data(), kMagic, sizeof(kMagic)) != 0) {
    std::fprintf(stderr, "emulate: %s is not a case file\n", argv[1]);
    return 2;
  }
  int64_t h[kHeaderInts];
  std::memcpy(h, bytes.data() + sizeof(kMagic), sizeof(h));
  Case c;
  dcnv3::Geometry& g = c.g;
  c.dtype = h[0];
  g.N = h[1], g.H = h[2], g.W = h[3], g.Ho = h[4], g.Wo = h[5], g.G = h[6], g.C = h[7], g.P = h[8];
  g.kh = h[9], g.kw = h[10], g.sh = h[11], g.sw = h[12], g.ph = h[13], g.pw = h[14], g.dh = h[15], g.dw = h[16];
  g.half_h = h[17], g.half_w = h[18], g.center = h[19], g.mask_logits = h[20] != 0;
  c.blocks = h[21], c.threads = h[22], c.seed = static_cast<uint64_t>(h[23]);
  c.op = h[24], c.offset_mask_channels = h[25], c.scalar_loads = h[26] != 0;
  if (c.op == 1) {
    dcnv3::set_packed_layout(g, c.offset_mask_channels);
  } else {
    dcnv3::set_separate_layout(g);
  }
  std::memcpy(&g.offset_scale, bytes.data() + sizeof(kMagic) + sizeof(h), sizeof(double));
  c.data = bytes.data() + header;
  c.data_bytes = bytes.size() - header;
  switch (c.dtype) {
    case 0:
      return run_case<double>(c, argv[2]);
    case 1:
      return run_case<float>(c, argv[2]);
    case 2:
      return run_case<c10::Half>(c, argv[2]);
    case 3:
      return run_case<c10::BFloat16>(c, argv[2]);
    default:
      std::fprintf(stderr, "emulate: unknown dtype code %lld\n", static_cast<long long>(c.dtype));
      return 2;
  }
}
