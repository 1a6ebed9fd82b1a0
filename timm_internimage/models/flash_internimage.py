"""FlashInternImage: InternImage with DCNv4 (OpenGVLab/DCNv4, classification/models/flash_intern_image.py).

Paper: `Efficient Deformable ConvNets: Rethinking Dynamic and Sparse Operator for Vision Applications`
    - https://arxiv.org/abs/2401.06197 (CVPR 2024)

The network is InternImage's (stem, stages, downsamples, heads, the timm API: :class:`InternImage`), with two
differences in its blocks: the core op is :class:`~timm_internimage.ops.DCNv4` (one packed offset/weight linear,
after an optional depthwise conv, no softmax), and the biases of DCNv4's output projection and of the MLP's second
layer are options (``dcn_output_bias``, ``mlp_fc2_bias``, both off but in L). Official checkpoints load through the
same :func:`checkpoint_filter_fn` as InternImage's; its detection / segmentation checkpoints have tags
(``DENSE_TAGS``) as InternImage's do.
"""
from functools import partial
from typing import Any, Dict, Optional, Sequence

from timm.layers import LayerType
from timm.models import generate_default_cfgs, register_model

from .._manifest import published_results
from .internimage import DenseTag, InternImage, build_with_pretrained, dense_cfg, official_eval_cfg
from ..ops import DCNv4

__all__ = ['FlashInternImage', 'DENSE_TAGS']


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


def _create_flash_internimage(
        variant: str, pretrained: bool, model_args: Dict[str, Any], **kwargs: Any) -> FlashInternImage:
    return build_with_pretrained(FlashInternImage, variant, pretrained, model_args, DENSE_TAGS, **kwargs)


# Every FlashInternImage checkpoint (classification, detection, segmentation) is an official .pth in this Hub repo
# (named DENSE_REPO as InternImage's repo of detection / segmentation checkpoints is).
DENSE_REPO = 'OpenGVLab/DCNv4'
_REPO_URL = 'https://github.com/OpenGVLab/DCNv4'
_PAPER = dict(
    paper_ids='arXiv:2401.06197',
    paper_name='Efficient Deformable ConvNets: Rethinking Dynamic and Sparse Operator for Vision Applications',
)


def _cfg(filename: str, img_size: int = 224) -> Dict[str, Any]:
    """Pretrained cfg of an official classifier in the Hub repo OpenGVLab/DCNv4 (a ``.pth``, read with
    ``weights_only``), with the official evaluation preprocessing and the published top-1 (from the manifest)."""
    top1 = published_results(DENSE_REPO, filename)['top1']
    return dict(
        hf_hub_id=DENSE_REPO,
        hf_hub_filename=filename,
        num_classes=1000,
        **official_eval_cfg(img_size),
        description=f'ImageNet-1k top-1 {top1}% (published)',
        **_PAPER,
        origin_url=_REPO_URL,
    )


_DET = 'detection/configs/coco/'
_ADE = 'segmentation/configs/ade20k/'
_COCO_SIZE = (800, 1333)  # mmdet's test scale (the configs' img_scale (1333, 800))
# Every detection / segmentation config sets layer_scale=1.0 (the classification T has no layer scale: its blocks
# then lack gamma1/gamma2; S/B/L only change the initial value); the other backbone arguments are the
# classification variant's.
_LS = dict(layer_scale=1.0)

# ``model.tag`` -> checkpoint, as InternImage's DENSE_TAGS (tag names: ``<dataset>_<method>_<schedule or crop>``).
# Read off OpenGVLab/DCNv4 at commit 4b848f7dd7da (README.md, detection/configs/coco/*.py and README.md,
# segmentation/configs/ade20k/*.py and README.md). The checkpoints are named ``*_flash_internimage_*``, the Mask
# R-CNN and Cascade configs ``*_flash_intern_image_*``.
DENSE_TAGS = {
    **{f'flash_internimage_{size}.coco_mask_rcnn_{schedule}': DenseTag(
        f'mask_rcnn_flash_internimage_{size}_fpn_{schedule}_coco.pth',
        f'{_DET}mask_rcnn_flash_intern_image_{size}_fpn_{schedule}_coco.py',
        f'COCO Mask R-CNN {schedule}', _COCO_SIZE, _LS)
       for size in ('t', 's', 'b') for schedule in ('1x', '3x')},
    **{f'flash_internimage_l.coco_cascade_{schedule}': DenseTag(
        f'cascade_flash_internimage_l_fpn_{schedule}_coco.pth',
        f'{_DET}cascade_flash_intern_image_l_fpn_{schedule}_coco.py',
        f'COCO Cascade Mask R-CNN {schedule}', _COCO_SIZE, _LS)
       for schedule in ('1x', '3x')},
    **{f'flash_internimage_{size}.coco_dino_1x': DenseTag(
        f'dino_4scale_flash_internimage_{size}_1x_coco.pth', f'{_DET}dino_4scale_flash_internimage_{size}_1x_coco.py',
        'COCO DINO 4-scale 1x, ' + ('0.1x backbone lr' if size == 'l' else 'layer-wise lr'), _COCO_SIZE, _LS,
        (1, 2, 3))
       for size in ('t', 's', 'b', 'l')},
    **{f'flash_internimage_{size}.ade20k_upernet_{crop}': DenseTag(
        f'upernet_flash_internimage_{size}_{crop}_160k_ade20k.pth',
        f'{_ADE}upernet_flash_internimage_{size}_{crop}_160k_ade20k.py',
        'ADE20K UperNet 160k', (crop, crop), _LS)
       for size, crop in (('t', 512), ('s', 512), ('b', 512), ('l', 640))},
}


_CLASSIFICATION_CFGS = {
    'flash_internimage_t.in1k': _cfg('flash_intern_image_t_1k_224.pth'),
    'flash_internimage_s.in1k': _cfg('flash_intern_image_s_1k_224.pth'),
    'flash_internimage_b.in1k': _cfg('flash_intern_image_b_1k_224.pth'),
    'flash_internimage_l.in22k_ft_in1k_384': _cfg('flash_internimage_l_22kto1k_384.pth', img_size=384),
}

# The first tag of a model is its default: the classification tag comes first.
default_cfgs = generate_default_cfgs({**_CLASSIFICATION_CFGS, **{
    name: dense_cfg(tag, DENSE_REPO, **_PAPER, origin_url=f'{_REPO_URL}/blob/main/{tag.config}')
    for name, tag in DENSE_TAGS.items()}})


@register_model
def flash_internimage_t(pretrained: bool = False, **kwargs: Any) -> FlashInternImage:
    """FlashInternImage-T"""
    model_args = dict(channels=64, depths=(4, 4, 18, 4), groups=(4, 8, 16, 32), offset_scale=1.0)
    return _create_flash_internimage('flash_internimage_t', pretrained, model_args, **kwargs)


@register_model
def flash_internimage_s(pretrained: bool = False, **kwargs: Any) -> FlashInternImage:
    """FlashInternImage-S"""
    model_args = dict(
        channels=80, depths=(4, 4, 21, 4), groups=(5, 10, 20, 40), layer_scale=1e-5, offset_scale=1.0,
        post_norm=True, dw_kernel_size=3)
    return _create_flash_internimage('flash_internimage_s', pretrained, model_args, **kwargs)


@register_model
def flash_internimage_b(pretrained: bool = False, **kwargs: Any) -> FlashInternImage:
    """FlashInternImage-B"""
    model_args = dict(
        channels=112, depths=(4, 4, 21, 4), groups=(7, 14, 28, 56), layer_scale=1e-5, offset_scale=0.5,
        post_norm=True, dw_kernel_size=3)
    return _create_flash_internimage('flash_internimage_b', pretrained, model_args, **kwargs)


@register_model
def flash_internimage_l(pretrained: bool = False, **kwargs: Any) -> FlashInternImage:
    """FlashInternImage-L"""
    model_args = dict(
        channels=160, depths=(5, 5, 22, 5), groups=(10, 20, 40, 80), layer_scale=1e-5, offset_scale=2.0,
        post_norm=True, dw_kernel_size=3, dcn_output_bias=True, mlp_fc2_bias=True)
    return _create_flash_internimage('flash_internimage_l', pretrained, model_args, **kwargs)
