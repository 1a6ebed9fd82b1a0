// Launchers of the DCNv3 and DCNv4 CUDA kernels (dcnv3_kernels.cuh,
// dcnv4_kernels.cuh), on the torch stable ABI.
#include <cuda_runtime.h>

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/macros.h>

#include <algorithm>

#include "../dcnv3_common.h"
#include "dcnv3_kernels.cuh"
#include "dcnv4_kernels.cuh"

#ifndef DCNV3_CUDA_ARCHS
#define DCNV3_CUDA_ARCHS "unknown"
#endif

namespace dcnv3 {
namespace {

unsigned int blocks_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), int64_t(1) << 30));
}

cudaStream_t current_stream(int32_t device_index) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream));
  return static_cast<cudaStream_t>(stream);
}

// Raises a clear error when this build has no kernel image for the current
// GPU, instead of failing (or, as the official op did, returning zeros).
void check_kernel_image(const void* kernel, int32_t device_index) {
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction ||
      err == cudaErrorUnsupportedPtxVersion || err == cudaErrorInvalidPtx) {
    (void)cudaGetLastError();
    int major = 0, minor = 0;
    (void)cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device_index);
    (void)cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device_index);
    STD_TORCH_CHECK(
        false,
        "timm_internimage_dcnv3: this build has no CUDA kernel for the GPU (compute capability ",
        major,
        ".",
        minor,
        "); it was built for TORCH_CUDA_ARCH_LIST=",
        DCNV3_CUDA_ARCHS,
        ". Rebuild the extension for this GPU or use the pure-PyTorch backend (",
        cudaGetErrorString(err),
        ")");
  }
  STD_CUDA_CHECK(err);
}

Tensor forward_impl(
    const char* name, const Geometry& g, const Tensor& input_, const Tensor& offset_, const Tensor& mask_) {
  const int32_t device = input_.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const Tensor input = torch::stable::contiguous(input_);
  const Tensor offset = torch::stable::contiguous(offset_);
  const Tensor mask = torch::stable::contiguous(mask_);
  Tensor out = torch::stable::new_empty(input, output_shape(g));
  const int64_t total = out.numel();
  const cudaStream_t stream = current_stream(device);
  dispatch_floating(input.scalar_type(), name, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    auto kernel = forward_kernel<scalar_t>;
    check_kernel_image(reinterpret_cast<const void*>(kernel), device);
    kernel<<<blocks_for(total), kThreads, 0, stream>>>(
        g, input.const_data_ptr<scalar_t>(), offset.const_data_ptr<scalar_t>(), mask.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), total);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> backward_impl(
    const char* name,
    const Geometry& g,
    const Tensor& grad_output_,
    const Tensor& input_,
    const Tensor& offset_,
    const Tensor& mask_) {
  const int32_t device = input_.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const Tensor grad_output = torch::stable::contiguous(grad_output_);
  const Tensor input = torch::stable::contiguous(input_);
  const Tensor offset = torch::stable::contiguous(offset_);
  const Tensor mask = torch::stable::contiguous(mask_);
  // Named references, not structured bindings: the launch lambdas capture them (C++17).
  auto gradients = new_gradients(g, input, offset, mask);
  Tensor& grad_input = std::get<0>(gradients);
  Tensor& grad_offset = std::get<1>(gradients);
  Tensor& grad_mask = std::get<2>(gradients);
  const int64_t total = g.positions() * g.G;
  const cudaStream_t stream = current_stream(device);
  dispatch_floating(input.scalar_type(), name, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = opmath_t<scalar_t>;
    constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
    // Half types accumulate grad_input in a float buffer, then cast.
    Tensor gin_buf = kSame ? grad_input
                           : torch::stable::new_zeros(input, {g.N, g.H, g.W, g.G * g.C}, ScalarType::Float);
    acc_t* gin = gin_buf.mutable_data_ptr<acc_t>();
    auto launch = [&](auto kernel) {
      check_kernel_image(reinterpret_cast<const void*>(kernel), device);
      kernel<<<blocks_for(total), kThreads, 0, stream>>>(
          g, grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
          offset.const_data_ptr<scalar_t>(), mask.const_data_ptr<scalar_t>(), gin,
          grad_offset.mutable_data_ptr<scalar_t>(), grad_mask.mutable_data_ptr<scalar_t>(), total);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (g.mask_logits) {
      launch(backward_kernel<scalar_t, true>);
    } else {
      launch(backward_kernel<scalar_t, false>);
    }
    if constexpr (!kSame) {
      const int64_t n_in = grad_input.numel();
      auto kernel = cast_kernel<scalar_t, acc_t>;
      check_kernel_image(reinterpret_cast<const void*>(kernel), device);
      kernel<<<blocks_for(n_in), kThreads, 0, stream>>>(gin, grad_input.mutable_data_ptr<scalar_t>(), n_in);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return gradients;
}

Tensor packed_forward_impl(const char* name, const Geometry& g, const Tensor& input_, const Tensor& offset_mask_) {
  const int32_t device = input_.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const Tensor input = torch::stable::contiguous(input_);
  const Tensor offset_mask = torch::stable::contiguous(offset_mask_);
  Tensor out = torch::stable::new_empty(input, output_shape(g));
  const cudaStream_t stream = current_stream(device);
  dispatch_floating(input.scalar_type(), name, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    constexpr int kVec = vector_channels<scalar_t>();
    const int64_t total = g.positions() * g.G * ((g.C + kVec - 1) / kVec);
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* om = offset_mask.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    auto launch = [&](auto kernel) {
      check_kernel_image(reinterpret_cast<const void*>(kernel), device);
      kernel<<<blocks_for(total), kThreads, 0, stream>>>(g, x, om, om + 2 * g.P, o, total);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (channels_vectorizable<scalar_t>(g, x, o)) {
      launch(packed_forward_kernel<scalar_t, true>);
    } else {
      launch(packed_forward_kernel<scalar_t, false>);
    }
  });
  return out;
}

std::tuple<Tensor, Tensor> packed_backward_impl(
    const char* name, const Geometry& g, const Tensor& grad_output_, const Tensor& input_, const Tensor& offset_mask_) {
  const int32_t device = input_.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const Tensor grad_output = torch::stable::contiguous(grad_output_);
  const Tensor input = torch::stable::contiguous(input_);
  const Tensor offset_mask = torch::stable::contiguous(offset_mask_);
  auto gradients = new_packed_gradients(g, input, offset_mask);
  Tensor& grad_input = std::get<0>(gradients);
  Tensor& grad_offset_mask = std::get<1>(gradients);
  const int64_t total = g.positions() * g.G;
  const cudaStream_t stream = current_stream(device);
  dispatch_floating(input.scalar_type(), name, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = opmath_t<scalar_t>;
    constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
    Tensor gin_buf = kSame ? grad_input
                           : torch::stable::new_zeros(input, {g.N, g.H, g.W, g.G * g.C}, ScalarType::Float);
    acc_t* gin = gin_buf.mutable_data_ptr<acc_t>();
    const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* om = offset_mask.const_data_ptr<scalar_t>();
    scalar_t* gom = grad_offset_mask.mutable_data_ptr<scalar_t>();
    auto launch = [&](auto kernel) {
      check_kernel_image(reinterpret_cast<const void*>(kernel), device);
      kernel<<<blocks_for(total), kThreads, 0, stream>>>(
          g, go, x, om, om + 2 * g.P, gin, gom, gom + 2 * g.P, total);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    };
    const bool aligned = channels_vectorizable<scalar_t>(g, go, x);
    if (aligned && g.mask_logits) {
      launch(packed_backward_kernel<scalar_t, true, true>);
    } else if (aligned) {
      launch(packed_backward_kernel<scalar_t, true, false>);
    } else if (g.mask_logits) {
      launch(packed_backward_kernel<scalar_t, false, true>);
    } else {
      launch(packed_backward_kernel<scalar_t, false, false>);
    }
    if constexpr (!kSame) {
      const int64_t n_in = grad_input.numel();
      auto kernel = cast_kernel<scalar_t, acc_t>;
      check_kernel_image(reinterpret_cast<const void*>(kernel), device);
      kernel<<<blocks_for(n_in), kThreads, 0, stream>>>(gin, grad_input.mutable_data_ptr<scalar_t>(), n_in);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return gradients;
}

}  // namespace
}  // namespace dcnv3

STABLE_TORCH_LIBRARY_IMPL(timm_internimage, CUDA, m) {
  using dcnv3::Device;
  m.impl("dcnv3_forward", TORCH_BOX((&dcnv3::forward_entry<&dcnv3::forward_impl, Device::CUDA, false>)));
  m.impl("dcnv3_backward", TORCH_BOX((&dcnv3::backward_entry<&dcnv3::backward_impl, Device::CUDA, false>)));
  m.impl("dcnv3_softmax_forward", TORCH_BOX((&dcnv3::forward_entry<&dcnv3::forward_impl, Device::CUDA, true>)));
  m.impl("dcnv3_softmax_backward", TORCH_BOX((&dcnv3::backward_entry<&dcnv3::backward_impl, Device::CUDA, true>)));
  m.impl("dcnv4_forward", TORCH_BOX((&dcnv3::packed_forward_entry<&dcnv3::packed_forward_impl, Device::CUDA>)));
  m.impl("dcnv4_backward", TORCH_BOX((&dcnv3::packed_backward_entry<&dcnv3::packed_backward_impl, Device::CUDA>)));
}
