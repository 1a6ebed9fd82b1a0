"""Compiled DCNv3 and DCNv4 operators (CPU and CUDA) for timm-internimage.

Importing this package loads the kernels and registers the ops
``torch.ops.timm_internimage.dcnv3_forward`` / ``dcnv3_backward`` (and the
fused-softmax ``dcnv3_softmax_forward`` / ``dcnv3_softmax_backward``), and
DCNv4's ``dcnv4_forward`` / ``dcnv4_backward`` on the packed ``offset_mask``.
"""

from ._ops import built_with_cuda, cuda_load_error, cuda_loaded, dcnv3, dcnv4, set_create_graph_backward, supports

__version__ = "0.1.0"

__all__ = [
    "__version__", "built_with_cuda", "cuda_load_error", "cuda_loaded", "dcnv3", "dcnv4", "set_create_graph_backward",
    "supports",
]
