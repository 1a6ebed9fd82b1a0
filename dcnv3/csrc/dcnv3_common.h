// Host-side helpers shared by the CPU and CUDA entry points: argument
// validation, geometry, dtype dispatch. Uses only the torch stable ABI.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "dcnv3_sampling.h"

namespace dcnv3 {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<scalar_t>{}) for the floating dtypes the op supports.
template <typename F>
void dispatch_floating(ScalarType st, const char* name, F&& f) {
  switch (st) {
    case ScalarType::Float:
      f(TypeTag<float>{});
      break;
    case ScalarType::Double:
      f(TypeTag<double>{});
      break;
    case ScalarType::Half:
      f(TypeTag<c10::Half>{});
      break;
    case ScalarType::BFloat16:
      f(TypeTag<c10::BFloat16>{});
      break;
    default:
      STD_TORCH_CHECK(
          false,
          name,
          ": unsupported dtype (expected float32, float64, float16 or bfloat16)");
  }
}

inline int64_t out_size(int64_t in, int64_t pad, int64_t dil, int64_t k, int64_t stride) {
  return (in + 2 * pad - (dil * (k - 1) + 1)) / stride + 1;
}

// Validates the arguments shared by both ops (input, kernel, group) and
// returns the geometry, without the offset/weight addressing.
inline Geometry make_base_geometry(
    const char* name,
    const Tensor& input,
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
  STD_TORCH_CHECK(input.dim() == 4, name, ": input must be (N, H, W, group*group_channels)");
  STD_TORCH_CHECK(kernel_h > 0 && kernel_w > 0, name, ": kernel size must be positive");
  STD_TORCH_CHECK(stride_h > 0 && stride_w > 0, name, ": stride must be positive");
  STD_TORCH_CHECK(pad_h >= 0 && pad_w >= 0, name, ": padding must be non-negative");
  STD_TORCH_CHECK(dilation_h > 0 && dilation_w > 0, name, ": dilation must be positive");
  STD_TORCH_CHECK(group > 0 && group_channels > 0, name, ": group and group_channels must be positive");
  STD_TORCH_CHECK(
      !remove_center || (kernel_h % 2 == 1 && kernel_w % 2 == 1),
      name,
      ": remove_center needs an odd kernel size");
  STD_TORCH_CHECK(
      kernel_h * kernel_w > (remove_center ? 1 : 0), name, ": remove_center leaves a 1x1 kernel with no points");
  // The kernels address rows and columns in 32 bits (flat offsets are 64-bit).
  STD_TORCH_CHECK(
      input.size(1) > 0 && input.size(2) > 0 && input.size(1) < (int64_t(1) << 31) &&
          input.size(2) < (int64_t(1) << 31),
      name,
      ": input height and width must be between 1 and 2^31 - 1");

  Geometry g;
  g.N = input.size(0);
  g.H = input.size(1);
  g.W = input.size(2);
  g.G = group;
  g.C = group_channels;
  g.kh = kernel_h;
  g.kw = kernel_w;
  g.sh = stride_h;
  g.sw = stride_w;
  g.ph = pad_h;
  g.pw = pad_w;
  g.dh = dilation_h;
  g.dw = dilation_w;
  g.half_h = (dilation_h * (kernel_h - 1)) / 2;
  g.half_w = (dilation_w * (kernel_w - 1)) / 2;
  g.center = remove_center ? (kernel_w / 2) * kernel_h + kernel_h / 2 : -1;
  g.P = kernel_h * kernel_w - (remove_center ? 1 : 0);
  g.offset_scale = offset_scale;
  g.mask_logits = mask_logits;
  g.Ho = out_size(g.H, pad_h, dilation_h, kernel_h, stride_h);
  g.Wo = out_size(g.W, pad_w, dilation_w, kernel_w, stride_w);

  STD_TORCH_CHECK(
      input.size(3) == group * group_channels,
      name,
      ": input has ",
      input.size(3),
      " channels but group*group_channels = ",
      group * group_channels);
  STD_TORCH_CHECK(g.Ho > 0 && g.Wo > 0, name, ": output size would be empty");
  STD_TORCH_CHECK(
      !mask_logits || g.P <= kMaxSoftmaxPoints,
      name,
      ": the fused softmax supports at most ",
      kMaxSoftmaxPoints,
      " kernel points");
  set_separate_layout(g);
  return g;
}

inline void check_same_dtype_device(const char* name, const Tensor& input, const Tensor& other, const char* what) {
  STD_TORCH_CHECK(other.dim() == 4, name, ": ", what, " must be (N, Ho, Wo, channels)");
  STD_TORCH_CHECK(input.scalar_type() == other.scalar_type(), name, ": input and ", what, " must have the same dtype");
  STD_TORCH_CHECK(
      input.get_device() == other.get_device() && input.is_cuda() == other.is_cuda(),
      name,
      ": input and ",
      what,
      " must be on the same device");
}

// Validates the arguments of one DCNv3 call (separate offset and mask) and returns its geometry.
inline Geometry make_geometry(
    const char* name,
    const Tensor& input,
    const Tensor& offset,
    const Tensor& mask,
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
  STD_TORCH_CHECK(input.dim() == 4, name, ": input must be (N, H, W, group*group_channels)");
  STD_TORCH_CHECK(offset.dim() == 4, name, ": offset must be (N, Ho, Wo, group*P*2)");
  STD_TORCH_CHECK(mask.dim() == 4, name, ": mask must be (N, Ho, Wo, group*P)");
  STD_TORCH_CHECK(
      input.scalar_type() == offset.scalar_type() && input.scalar_type() == mask.scalar_type(),
      name,
      ": input, offset and mask must have the same dtype");
  STD_TORCH_CHECK(
      input.get_device() == offset.get_device() && input.get_device() == mask.get_device() &&
          input.is_cuda() == offset.is_cuda() && input.is_cuda() == mask.is_cuda(),
      name,
      ": input, offset and mask must be on the same device");
  const Geometry g = make_base_geometry(
      name, input, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
      group_channels, offset_scale, remove_center, mask_logits);
  STD_TORCH_CHECK(
      offset.size(0) == g.N && offset.size(1) == g.Ho && offset.size(2) == g.Wo &&
          offset.size(3) == group * g.P * 2,
      name,
      ": offset must have shape (",
      g.N, ", ", g.Ho, ", ", g.Wo, ", ", group * g.P * 2, ")");
  STD_TORCH_CHECK(
      mask.size(0) == g.N && mask.size(1) == g.Ho && mask.size(2) == g.Wo &&
          mask.size(3) == group * g.P,
      name,
      ": mask must have shape (",
      g.N, ", ", g.Ho, ", ", g.Wo, ", ", group * g.P, ")");
  return g;
}

// Channels of DCNv4's packed offset_mask in the official module: 3*G*P rounded up to a multiple of 8.
inline int64_t padded_offset_mask_channels(int64_t group, int64_t points) {
  return (3 * group * points + 7) / 8 * 8;
}

// Validates the arguments of one DCNv4 call (one packed offset_mask, with or
// without the official padding channels) and returns its geometry.
inline Geometry make_packed_geometry(
    const char* name,
    const Tensor& input,
    const Tensor& offset_mask,
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
    bool softmax) {
  STD_TORCH_CHECK(input.dim() == 4, name, ": input must be (N, H, W, group*group_channels)");
  check_same_dtype_device(name, input, offset_mask, "offset_mask");
  Geometry g = make_base_geometry(
      name, input, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
      group_channels, offset_scale, remove_center, softmax);
  const int64_t used = 3 * group * g.P;
  const int64_t padded = padded_offset_mask_channels(group, g.P);
  STD_TORCH_CHECK(
      offset_mask.size(0) == g.N && offset_mask.size(1) == g.Ho && offset_mask.size(2) == g.Wo &&
          offset_mask.size(3) >= used && offset_mask.size(3) <= padded,
      name,
      ": offset_mask must have shape (",
      g.N, ", ", g.Ho, ", ", g.Wo, ", M) with ", used, " <= M <= ", padded);
  set_packed_layout(g, offset_mask.size(3));
  return g;
}

inline std::vector<int64_t> output_shape(const Geometry& g) {
  return {g.N, g.Ho, g.Wo, g.G * g.C};
}

inline void check_grad_output(const char* name, const Tensor& grad_output, const Tensor& input, const Geometry& g) {
  STD_TORCH_CHECK(grad_output.dim() == 4, name, ": grad_output must be 4-D");
  STD_TORCH_CHECK(
      grad_output.size(0) == g.N && grad_output.size(1) == g.Ho && grad_output.size(2) == g.Wo &&
          grad_output.size(3) == g.G * g.C,
      name,
      ": grad_output has the wrong shape");
  STD_TORCH_CHECK(
      grad_output.scalar_type() == input.scalar_type(), name, ": grad_output must have the input dtype");
  STD_TORCH_CHECK(
      grad_output.get_device() == input.get_device() && grad_output.is_cuda() == input.is_cuda(),
      name,
      ": grad_output must be on the input's device");
}

// Whether float/double: those accumulate grad_input in place (zeroed first); the half types accumulate in a
// float buffer and write grad_input by a cast.
inline bool accumulates_in_place(ScalarType st) {
  return st == ScalarType::Float || st == ScalarType::Double;
}

// The gradients' tensors for one backward call: grad_input zeroed where the kernels accumulate into it; every
// element of grad_offset and grad_mask is written by the kernels.
inline std::tuple<Tensor, Tensor, Tensor> new_gradients(
    const Geometry& g, const Tensor& input, const Tensor& offset, const Tensor& mask) {
  const std::vector<int64_t> input_shape = {g.N, g.H, g.W, g.G * g.C};
  return std::make_tuple(
      accumulates_in_place(input.scalar_type()) ? torch::stable::new_zeros(input, input_shape)
                                                : torch::stable::new_empty(input, input_shape),
      torch::stable::new_empty(offset, {g.N, g.Ho, g.Wo, g.G * g.P * 2}),
      torch::stable::new_empty(mask, {g.N, g.Ho, g.Wo, g.G * g.P}));
}

// A device's implementations get the checked geometry and the caller's tensors (not yet contiguous: a device
// may need its guard first), and only calls with something to compute.
using ForwardImpl = Tensor (*)(const char* name, const Geometry&, const Tensor&, const Tensor&, const Tensor&);
using BackwardImpl = std::tuple<Tensor, Tensor, Tensor> (*)(
    const char* name, const Geometry&, const Tensor&, const Tensor&, const Tensor&, const Tensor&);

enum class Device { CPU, CUDA };

constexpr const char* device_name(Device device) {
  return device == Device::CUDA ? "CUDA" : "CPU";
}

inline bool on_device(const Tensor& t, Device device) {
  return device == Device::CUDA ? t.is_cuda() : t.is_cpu();
}

// An error naming the entry point unless every tensor is on `device`.
template <typename... Tensors>
void check_device(const char* name, Device device, const Tensors&... tensors) {
  STD_TORCH_CHECK((on_device(tensors, device) && ...), name, ": expected ", device_name(device), " tensors");
}

// Entry points with exactly the schema's arguments (what TORCH_BOX registers), shared by CPU and CUDA: the
// device check, the validation (make_geometry), and the empty calls, before a device's implementation runs.
template <ForwardImpl kImpl, Device kDevice, bool kLogits>
Tensor forward_entry(
    Tensor input,
    Tensor offset,
    Tensor mask,
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
    bool remove_center) {
  const char* name = kDevice == Device::CUDA ? "timm_internimage::dcnv3_forward (CUDA)"
                                             : "timm_internimage::dcnv3_forward (CPU)";
  check_device(name, kDevice, input, offset, mask);
  const Geometry g = make_geometry(
      name, input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
      group, group_channels, offset_scale, remove_center, kLogits);
  if (g.positions() * g.G * g.C == 0) {
    return torch::stable::new_empty(input, output_shape(g));
  }
  return kImpl(name, g, input, offset, mask);
}

template <BackwardImpl kImpl, Device kDevice, bool kLogits>
std::tuple<Tensor, Tensor, Tensor> backward_entry(
    Tensor grad_output,
    Tensor input,
    Tensor offset,
    Tensor mask,
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
    bool remove_center) {
  const char* name = kDevice == Device::CUDA ? "timm_internimage::dcnv3_backward (CUDA)"
                                             : "timm_internimage::dcnv3_backward (CPU)";
  check_device(name, kDevice, grad_output, input, offset, mask);
  const Geometry g = make_geometry(
      name, input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
      group, group_channels, offset_scale, remove_center, kLogits);
  check_grad_output(name, grad_output, input, g);
  if (g.positions() * g.G == 0 || input.numel() == 0) {
    // Nothing to compute (an empty batch): every gradient is zero, whatever its dtype.
    return std::make_tuple(
        torch::stable::new_zeros(input, {g.N, g.H, g.W, g.G * g.C}),
        torch::stable::new_zeros(offset, {g.N, g.Ho, g.Wo, g.G * g.P * 2}),
        torch::stable::new_zeros(mask, {g.N, g.Ho, g.Wo, g.G * g.P}));
  }
  return kImpl(name, g, grad_output, input, offset, mask);
}

// DCNv4's entry points: the same device check, validation and empty calls
// for (input, offset_mask) and a runtime softmax flag. An implementation
// gets the weights' base as a second view of offset_mask (the kernels
// address both through the geometry) and returns (grad_input,
// grad_offset_mask), the padding channels zero.
using PackedForwardImpl = Tensor (*)(const char* name, const Geometry&, const Tensor&, const Tensor&);
using PackedBackwardImpl = std::tuple<Tensor, Tensor> (*)(
    const char* name, const Geometry&, const Tensor&, const Tensor&, const Tensor&);

template <PackedForwardImpl kImpl, Device kDevice>
Tensor packed_forward_entry(
    Tensor input,
    Tensor offset_mask,
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
    bool softmax) {
  const char* name = kDevice == Device::CUDA ? "timm_internimage::dcnv4_forward (CUDA)"
                                             : "timm_internimage::dcnv4_forward (CPU)";
  check_device(name, kDevice, input, offset_mask);
  const Geometry g = make_packed_geometry(
      name, input, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
      group, group_channels, offset_scale, remove_center, softmax);
  if (g.positions() * g.G * g.C == 0) {
    return torch::stable::new_empty(input, output_shape(g));
  }
  return kImpl(name, g, input, offset_mask);
}

template <PackedBackwardImpl kImpl, Device kDevice>
std::tuple<Tensor, Tensor> packed_backward_entry(
    Tensor grad_output,
    Tensor input,
    Tensor offset_mask,
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
    bool softmax) {
  const char* name = kDevice == Device::CUDA ? "timm_internimage::dcnv4_backward (CUDA)"
                                             : "timm_internimage::dcnv4_backward (CPU)";
  check_device(name, kDevice, grad_output, input, offset_mask);
  const Geometry g = make_packed_geometry(
      name, input, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
      group, group_channels, offset_scale, remove_center, softmax);
  check_grad_output(name, grad_output, input, g);
  if (g.positions() * g.G == 0 || input.numel() == 0) {
    return std::make_tuple(
        torch::stable::new_zeros(input, {g.N, g.H, g.W, g.G * g.C}),
        torch::stable::new_zeros(offset_mask, {g.N, g.Ho, g.Wo, offset_mask.size(3)}));
  }
  return kImpl(name, g, grad_output, input, offset_mask);
}

// The gradients' tensors for one DCNv4 backward call: grad_input as in
// new_gradients, grad_offset_mask zeroed (the kernels write every used
// channel; the padding channels stay zero).
inline std::tuple<Tensor, Tensor> new_packed_gradients(const Geometry& g, const Tensor& input, const Tensor& offset_mask) {
  const std::vector<int64_t> input_shape = {g.N, g.H, g.W, g.G * g.C};
  return std::make_tuple(
      accumulates_in_place(input.scalar_type()) ? torch::stable::new_zeros(input, input_shape)
                                                : torch::stable::new_empty(input, input_shape),
      torch::stable::new_zeros(offset_mask, {g.N, g.Ho, g.Wo, g.off_pixel}));
}

}  // namespace dcnv3
