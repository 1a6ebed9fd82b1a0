// A minimal CUDA shim that lets dcnv3/csrc/cuda/dcnv3_kernels.cuh compile as
// plain host C++17 (g++), so that emulate.cpp can run the exact kernel bodies
// on the CPU. Include this header, then the .cuh.
//
// What it provides: the function-space qualifiers as no-ops, threadIdx /
// blockIdx / blockDim / gridDim as globals set by the launcher before each
// (block, thread) call, atomicAdd(float*) and atomicAdd(double*) as plain
// adds (threads run one after another, so a plain add is atomic), and the
// scalar types c10::Half / c10::BFloat16 from torch's header-only headers
// (no libtorch linking).
//
// What it cannot model (differences between this emulation and a real GPU):
// - Half/bfloat16 conversions: the device uses the __half/__nv_bfloat16
//   conversion intrinsics (cvt.rn.* instructions); here the host c10::Half /
//   c10::BFloat16 software conversions run. Both round to nearest even, but
//   the device code path itself is not executed.
// - Hardware float atomicAdd: on the GPU, concurrent atomics land in a
//   nondeterministic order. The emulation runs the (block, thread) pairs of a
//   launch in a seeded shuffled order, which models *a* different summation
//   order, but each thread runs its whole grid-stride loop at once and there
//   is no true concurrency (no lost updates are possible, none are expected).
// - nvcc code generation: nvcc contracts a*b+c into FMA by default
//   (--fmad=true) and may use other fast-math choices; g++ with -std=c++17
//   does not contract (-ffp-contract=off for ISO C++), so float32 results can
//   differ from the GPU by a few ulps.
// - Math functions: dcnv3_sampling.h calls floor/exp on the device
//   (__CUDA_ARCH__) and std::floor/std::exp on the host (this build, since
//   __CUDACC__ is not defined). floor is exact on both; CUDA's expf/exp are
//   within 1-2 ulp of glibc's, not bitwise equal.
// - Anything launch-related: __launch_bounds__, register limits, shared
//   memory, occupancy and timing are ignored.
#pragma once

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

// Function-space qualifiers and launch bounds: no-ops on the host. Defined
// after the c10 headers so that those keep their own host-only definitions.
#ifndef __global__
#define __global__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
// __restrict__ is a GNU keyword already understood by g++.

namespace cuda_shim {
struct Dim3 {
  unsigned int x = 1, y = 1, z = 1;
};
}  // namespace cuda_shim

// Built-in index variables of the running (block, thread) pair; the
// emulated launcher sets them before every call of a kernel.
inline cuda_shim::Dim3 threadIdx, blockIdx, blockDim, gridDim;

// Plain adds that return the old value, like CUDA's atomicAdd.
inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}

inline double atomicAdd(double* address, double value) {
  const double old = *address;
  *address = old + value;
  return old;
}
