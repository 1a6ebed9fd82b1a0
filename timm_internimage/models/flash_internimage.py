"""FlashInternImage: InternImage with DCNv4 (OpenGVLab/DCNv4, classification/models/flash_intern_image.py).

Paper: `Efficient Deformable ConvNets: Rethinking Dynamic and Sparse Operator for Vision Applications`
    - https://arxiv.org/abs/2401.06197 (CVPR 2024)

The network is InternImage's (stem, stages, downsamples, heads, the timm API: :class:`InternImage`), with two
differences in its blocks: the core op is :class:`~timm_internimage.ops.DCNv4` (one packed offset/weight linear,
after an optional depthwise conv, no softmax), and the biases of DCNv4's output projection and of the MLP's second
layer are options (``dcn_output_bias``, ``mlp_fc2_bias``, both off but in L). Official checkpoints load through the
same :func:`checkpoint_filter_fn` as InternImage's.
"""
from functools import partial
from typing import Any, Dict, Optional, Sequence

from timm.layers import LayerType
from timm.models import generate_default_cfgs, register_model

from .._manifest import repo_entry
from .internimage import InternImage, build_with_pretrained, official_eval_cfg
from ..ops import DCNv4

__all__ = ['FlashInternImage']


class FlashInternImage(InternImage):
    """FlashInternImage classifier / backbone. The official constructor arguments come first, in the official
    order; the rest are :class:`InternImage`'s."""

    def __init__(
            self,
            core_op: str = 'DCNv4',
            channels: int = 64,
            depths: Sequence[int] = (4, 4, 18, 4),
            groups: Sequence[int] = (4, 8, 16, 32),
            num_classes: int = 1000,
            mlp_ratio: float = 4.0,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            drop_path_type: str = 'linear',
            act_layer: LayerType = 'GELU',
            norm_layer: LayerType = 'LN',
            layer_scale: Optional[float] = None,
            offset_scale: float = 1.0,
            post_norm: bool = False,
            cls_scale: float = 1.5,
            with_cp: bool = False,
            mlp_fc2_bias: bool = False,
            dcn_output_bias: bool = False,
            dw_kernel_size: Optional[int] = None,
            use_clip_projector: bool = False,
            level2_post_norm: bool = False,
            level2_post_norm_block_ids: Optional[Sequence[int]] = None,
            res_post_norm: bool = False,
            center_feature_scale: bool = False,
            in_chans: int = 3,
            global_pool: Optional[str] = None,
            head_drop_rate: float = 0.0,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            core_op: the core operator, only ``'DCNv4'`` (``timm_internimage.set_backend`` picks its kernel).
            mlp_fc2_bias: bias in the MLPs' second layer.
            dcn_output_bias: bias in DCNv4's output projection.
            dw_kernel_size: depthwise conv before DCNv4's offset/weight linear (None: none).
            center_feature_scale: as officially, only keeps the stage norms under ``post_norm`` (the official
                model does not pass it to DCNv4).
            Other arguments: as :class:`InternImage`'s (``norm_layer`` is the norm of the stem, the downsamples
            and the H/G head; DCNv4 has none).
        """
        if core_op != 'DCNv4':
            raise ValueError(
                f"core_op={core_op!r} is not supported; FlashInternImage implements core_op='DCNv4' "
                f"(timm_internimage.set_backend picks its kernel)")
        super().__init__(
            core_op=core_op, channels=channels, depths=depths, groups=groups, num_classes=num_classes,
            mlp_ratio=mlp_ratio, drop_rate=drop_rate, drop_path_rate=drop_path_rate, drop_path_type=drop_path_type,
            act_layer=act_layer, norm_layer=norm_layer, layer_scale=layer_scale, offset_scale=offset_scale,
            post_norm=post_norm, cls_scale=cls_scale, with_cp=with_cp, use_clip_projector=use_clip_projector,
            level2_post_norm=level2_post_norm, level2_post_norm_block_ids=level2_post_norm_block_ids,
            res_post_norm=res_post_norm, center_feature_scale=center_feature_scale, in_chans=in_chans,
            global_pool=global_pool, head_drop_rate=head_drop_rate,
            dcn_layer=partial(DCNv4, dw_kernel_size=dw_kernel_size, output_bias=dcn_output_bias),
            mlp_fc2_bias=mlp_fc2_bias, device=device, dtype=dtype,
        )


def _create_flash_internimage(variant: str, pretrained: bool = False, **kwargs: Any) -> FlashInternImage:
    return build_with_pretrained(FlashInternImage, variant, pretrained, _VARIANT_ARGS[variant], **kwargs)


# The official model arguments of each variant (OpenGVLab/DCNv4 classification configs).
_VARIANT_ARGS = dict(
    flash_internimage_t=dict(channels=64, depths=(4, 4, 18, 4), groups=(4, 8, 16, 32), offset_scale=1.0),
    flash_internimage_s=dict(channels=80, depths=(4, 4, 21, 4), groups=(5, 10, 20, 40), layer_scale=1e-5,
                             offset_scale=1.0, post_norm=True, dw_kernel_size=3),
    flash_internimage_b=dict(channels=112, depths=(4, 4, 21, 4), groups=(7, 14, 28, 56), layer_scale=1e-5,
                             offset_scale=0.5, post_norm=True, dw_kernel_size=3),
    flash_internimage_l=dict(channels=160, depths=(5, 5, 22, 5), groups=(10, 20, 40, 80), layer_scale=1e-5,
                             offset_scale=2.0, post_norm=True, dw_kernel_size=3, dcn_output_bias=True,
                             mlp_fc2_bias=True),
)

_HUB_REPO = 'OpenGVLab/DCNv4'


def _cfg(filename: str, img_size: int = 224) -> Dict[str, Any]:
    """Pretrained cfg of an official checkpoint in the Hub repo OpenGVLab/DCNv4 (a ``.pth``, read with
    ``weights_only``), with the official evaluation preprocessing and the published top-1 (from the manifest)."""
    top1 = repo_entry(_HUB_REPO)['checkpoints'][filename]['top1']
    return dict(
        hf_hub_id=_HUB_REPO,
        hf_hub_filename=filename,
        num_classes=1000,
        **official_eval_cfg(img_size),
        description=f'ImageNet-1k top-1 {top1}% (published)',
        paper_ids='arXiv:2401.06197',
        paper_name='Efficient Deformable ConvNets: Rethinking Dynamic and Sparse Operator for Vision Applications',
        origin_url='https://github.com/OpenGVLab/DCNv4',
    )


# The first tag of a model is its default.
default_cfgs = generate_default_cfgs({
    'flash_internimage_t.in1k': _cfg('flash_intern_image_t_1k_224.pth'),
    'flash_internimage_s.in1k': _cfg('flash_intern_image_s_1k_224.pth'),
    'flash_internimage_b.in1k': _cfg('flash_intern_image_b_1k_224.pth'),
    'flash_internimage_l.in22k_ft_in1k_384': _cfg('flash_internimage_l_22kto1k_384.pth', img_size=384),
})


@register_model
def flash_internimage_t(pretrained: bool = False, **kwargs: Any) -> FlashInternImage:
    """FlashInternImage-T"""
    return _create_flash_internimage('flash_internimage_t', pretrained, **kwargs)


@register_model
def flash_internimage_s(pretrained: bool = False, **kwargs: Any) -> FlashInternImage:
    """FlashInternImage-S"""
    return _create_flash_internimage('flash_internimage_s', pretrained, **kwargs)


@register_model
def flash_internimage_b(pretrained: bool = False, **kwargs: Any) -> FlashInternImage:
    """FlashInternImage-B"""
    return _create_flash_internimage('flash_internimage_b', pretrained, **kwargs)


@register_model
def flash_internimage_l(pretrained: bool = False, **kwargs: Any) -> FlashInternImage:
    """FlashInternImage-L"""
    return _create_flash_internimage('flash_internimage_l', pretrained, **kwargs)
