// The one schema registration of the DCNv3 and DCNv4 operators (namespace
// timm_internimage). Kernels are registered per device in cpu/ and cuda/;
// fake kernels and autograd are registered from Python (_ops.py).
#include <torch/csrc/stable/library.h>

#define DCNV3_ARGS                                                                                    \
  "int kernel_h, int kernel_w, int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, " \
  "int dilation_w, int group, int group_channels, float offset_scale, bool remove_center"

STABLE_TORCH_LIBRARY(timm_internimage, m) {
  m.def("dcnv3_forward(Tensor input, Tensor offset, Tensor mask, " DCNV3_ARGS ") -> Tensor");
  m.def(
      "dcnv3_backward(Tensor grad_output, Tensor input, Tensor offset, Tensor mask, " DCNV3_ARGS
      ") -> (Tensor, Tensor, Tensor)");
  // Same op with `mask` holding logits; the softmax over the P points of each
  // group is computed inside the kernel (and differentiated there).
  m.def("dcnv3_softmax_forward(Tensor input, Tensor offset, Tensor mask_logits, " DCNV3_ARGS ") -> Tensor");
  m.def(
      "dcnv3_softmax_backward(Tensor grad_output, Tensor input, Tensor offset, Tensor mask_logits, " DCNV3_ARGS
      ") -> (Tensor, Tensor, Tensor)");
  // DCNv4: offsets and point weights in one packed offset_mask (N, Ho, Wo, M),
  // per group 2P offsets then P weights, M = 3*group*P or padded up to a
  // multiple of 8 (the padding is not read; its gradient is 0). The weights
  // are used as given, or, with softmax, normalised over the P points.
  m.def("dcnv4_forward(Tensor input, Tensor offset_mask, " DCNV3_ARGS ", bool softmax) -> Tensor");
  m.def(
      "dcnv4_backward(Tensor grad_output, Tensor input, Tensor offset_mask, " DCNV3_ARGS
      ", bool softmax) -> (Tensor, Tensor)");
}
