"""InternImage: large-scale vision foundation models with deformable convolutions (DCNv3).

Paper: `InternImage: Exploring Large-Scale Vision Foundation Models with Deformable Convolutions`
    - https://arxiv.org/abs/2211.05778 (CVPR 2023)

A timm-style port of the official classification models (OpenGVLab/InternImage), numerically
identical to them. Blocks run channels-last (NHWC) internally; the stem and every stage return NCHW views of
their channels-last results, so everything a user sees (``forward_features``, intermediates, feature maps, FX
feature extraction of the stages) is NCHW.

Heads:
    T/S/B/L/XL: ``forward_features`` returns the last stage (``num_features = 8 * channels``); the head
    is the official 1x1 conv (to ``cls_scale`` times the width) + BatchNorm + GELU, global pooling, fc.
    H/G: the official head fuses stages 2 and 3 (1x1 conv + pixel shuffle on stage 3, 1x1 conv on
    stage 2) into a 1024-channel map at stride 16; ``forward_features`` returns that map
    (``num_features = 1024``), and ``forward_head`` applies the attention pooling, LayerNorm and fc.
    Since the two maps must align, H/G classification inputs need ``ceil(side / 16)`` even (any multiple of 32
    works); stage outputs (``features_only``, intermediates) take any size of at least 32x32.
"""
import logging
import re
from functools import partial
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath, LayerType, SelectAdaptivePool2d, get_act_layer, register_notrace_function, trunc_normal_)
from timm.models import (
    build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model, resolve_pretrained_cfg)
# Private module: timm 1.0 exports feature_take_indices from no public namespace; timm's own models import it
# from here.
from timm.models._features import feature_take_indices

from .._manifest import hub_source, published_results, repo_entry
from ..ops import DCNv3, DCNv4
from ..ops.linear import linear

__all__ = ['InternImage', 'checkpoint_filter_fn', 'remap_checkpoint_keys', 'backbone_state_dict', 'DENSE_TAGS']

_logger = logging.getLogger(__name__)

_LN_EPS = 1e-6
_ATTN_POOL_DIM = 1024
_ATTN_POOL_HEADS = 16
_ATTN_POOL_OUT_DIM = 768


class ChannelsLastBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the last dimension of a tensor of any rank (the official ``'BN'`` on channels-last maps)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).view(x.shape)


_OFFICIAL_ACT_LAYERS = {'GELU': nn.GELU, 'ReLU': nn.ReLU, 'SiLU': nn.SiLU}
_OFFICIAL_NORM_LAYERS = {'LN': partial(nn.LayerNorm, eps=_LN_EPS), 'BN': ChannelsLastBatchNorm}


def _resolve_act_layer(act_layer: LayerType) -> Callable[..., nn.Module]:
    """Activation class for an official name (``'GELU'``, ``'ReLU'``, ``'SiLU'``), a timm name or a class."""
    if isinstance(act_layer, str) and act_layer in _OFFICIAL_ACT_LAYERS:
        return _OFFICIAL_ACT_LAYERS[act_layer]
    try:
        layer = get_act_layer(act_layer)
    except KeyError:
        layer = None
    if layer is None:
        raise ValueError(
            f'act_layer={act_layer!r} is not supported; use an official name {list(_OFFICIAL_ACT_LAYERS)}, '
            f'a timm activation name or an activation class')
    return layer


def _resolve_norm_layer(norm_layer: LayerType) -> Callable[..., nn.Module]:
    """Channels-last norm for an official name (``'LN'``, ``'BN'``) or a class/callable taking the channel count.

    LayerNorms use the official eps 1e-6: ``'LN'`` and a bare LayerNorm class get it, a ``partial`` keeps its own.
    """
    if isinstance(norm_layer, str) and norm_layer in _OFFICIAL_NORM_LAYERS:
        return _OFFICIAL_NORM_LAYERS[norm_layer]
    if isinstance(norm_layer, type) and issubclass(norm_layer, nn.LayerNorm):
        return partial(norm_layer, eps=_LN_EPS)
    if isinstance(norm_layer, str) or not callable(norm_layer):
        raise ValueError(
            f'norm_layer={norm_layer!r} is not supported; use an official name {list(_OFFICIAL_NORM_LAYERS)} '
            f'or a norm class over the last (channel) dimension')
    return norm_layer


class LayerScale(nn.Module):
    """Per-channel learnable scale (the official ``gamma1``/``gamma2``)."""

    def __init__(self, dim: int, init_value: float, device=None, dtype=None) -> None:
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        if not self.gamma.is_meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_value)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Stem(nn.Module):
    """Two stride-2 3x3 convs (NCHW in and out; the output is a view of a channels-last map)."""

    def __init__(
            self,
            in_chans: int,
            out_chans: int,
            act_layer: Callable[..., nn.Module],
            norm_layer: Callable[..., nn.Module],
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans // 2, 3, stride=2, padding=1, **dd)
        self.norm1 = norm_layer(out_chans // 2, **dd)
        self.act = act_layer()
        self.conv2 = nn.Conv2d(out_chans // 2, out_chans, 3, stride=2, padding=1, **dd)
        self.norm2 = norm_layer(out_chans, **dd)

    def forward(self, x: Tensor) -> Tensor:
        # The activation runs on the NCHW view, as in the official model: same values, same float rounding.
        x = self.act(self.norm1(self.conv1(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        return self.norm2(self.conv2(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    """Stride-2 3x3 conv doubling the channels, then the norm (NCHW in, NHWC out)."""

    def __init__(
            self,
            in_chans: int,
            out_chans: int,
            norm_layer: Callable[..., nn.Module],
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, 3, stride=2, padding=1, bias=False, **dd)
        self.norm = norm_layer(out_chans, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class Mlp(nn.Module):
    def __init__(
            self, dim: int, hidden_dim: int, act_layer: type, drop: float, fc2_bias: bool = True, device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, **dd)
        self.act = act_layer()
        # A GELU goes into fc1's oneDNN call on CPU (ops.linear.linear).
        self.gelu_approximate: Optional[str] = self.act.approximate if isinstance(self.act, nn.GELU) else None
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=fc2_bias, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        hidden = linear(x, self.fc1.weight, self.fc1.bias, gelu=self.gelu_approximate)
        if self.gelu_approximate is None:
            hidden = self.act(hidden)
        return self.drop2(linear(self.drop1(hidden), self.fc2.weight, self.fc2.bias))


class InternImageBlock(nn.Module):
    """DCNv3 + MLP residual block (NHWC).

    Norm placement follows the official flags: ``post_norm`` normalises each branch output instead of its
    input; ``res_post_norm`` (only when there is neither post_norm nor layer scale) adds a norm after
    each pre-normed branch; ``out_norm`` is the extra norm the H/G configs apply after selected stage-2 blocks.
    These are LayerNorms, as in the official model; ``norm_layer`` is the norm of DCNv3's offset/mask branch.
    ``dcn_layer`` replaces DCNv3 (FlashInternImage's DCNv4): called as ``dcn_layer(dim, group=, offset_scale=,
    device=, dtype=)``; ``mlp_fc2_bias`` is the bias of the MLP's second layer.
    """

    def __init__(
            self,
            dim: int,
            group: int,
            mlp_ratio: float = 4.0,
            drop: float = 0.0,
            drop_path: float = 0.0,
            act_layer: Callable[..., nn.Module] = nn.GELU,
            norm_layer: Callable[..., nn.Module] = _OFFICIAL_NORM_LAYERS['LN'],
            post_norm: bool = False,
            layer_scale: Optional[float] = None,
            offset_scale: float = 1.0,
            dw_kernel_size: Optional[int] = None,
            res_post_norm: bool = False,
            center_feature_scale: bool = False,
            remove_center: bool = False,
            out_norm: bool = False,
            dcn_layer: Optional[Callable[..., nn.Module]] = None,
            mlp_fc2_bias: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS, **dd)
        if dcn_layer is not None:
            self.dcn = dcn_layer(dim, group=group, offset_scale=offset_scale, **dd)
        else:
            self.dcn = DCNv3(
                dim, kernel_size=3, dw_kernel_size=dw_kernel_size, stride=1, pad=1, dilation=1, group=group,
                offset_scale=offset_scale, act_layer=act_layer, norm_layer=norm_layer,
                center_feature_scale=center_feature_scale, remove_center=remove_center, **dd)
        use_res_post_norm = res_post_norm and not post_norm and layer_scale is None
        self.res_post_norm1 = nn.LayerNorm(dim, eps=_LN_EPS, **dd) if use_res_post_norm else nn.Identity()
        self.ls1 = LayerScale(dim, layer_scale, **dd) if layer_scale is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer, drop, mlp_fc2_bias, **dd)
        self.res_post_norm2 = nn.LayerNorm(dim, eps=_LN_EPS, **dd) if use_res_post_norm else nn.Identity()
        self.ls2 = LayerScale(dim, layer_scale, **dd) if layer_scale is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.out_norm = nn.LayerNorm(dim, eps=_LN_EPS, **dd) if out_norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.post_norm:
            x = x + self.drop_path1(self.ls1(self.norm1(self.dcn(x))))
            x = x + self.drop_path2(self.ls2(self.norm2(self.mlp(x))))
        else:
            x = x + self.drop_path1(self.ls1(self.res_post_norm1(self.dcn(self.norm1(x)))))
            x = x + self.drop_path2(self.ls2(self.res_post_norm2(self.mlp(self.norm2(x)))))
        return self.out_norm(x)


class InternImageStage(nn.Module):
    """Optional downsample, then blocks (NHWC), then the stage norm.

    NCHW in and out, as timm's feature extractors expect of a stage; the permutes are views of channels-last
    maps, so the blocks see contiguous NHWC tensors.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            depth: int,
            group: int,
            downsample: bool,
            drop_path_rates: Sequence[float],
            use_norm: bool,
            norm_layer: Callable[..., nn.Module],
            out_norm_block_ids: Sequence[int] = (),
            device=None,
            dtype=None,
            **block_kwargs: Any,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grad_checkpointing = False
        self.has_downsample = downsample
        self.downsample = Downsample(in_chs, out_chs, norm_layer, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            InternImageBlock(
                out_chs, group, drop_path=drop_path_rates[i], norm_layer=norm_layer,
                out_norm=i in out_norm_block_ids, **dd, **block_kwargs)
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(out_chs, eps=_LN_EPS, **dd) if use_norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x) if self.has_downsample else x.permute(0, 2, 3, 1)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x).permute(0, 3, 1, 2)


class ConvPoolHead(nn.Module):
    """T-XL head: 1x1 conv + BatchNorm + act (NCHW), global pooling, dropout, fc."""

    def __init__(
            self,
            in_chs: int,
            hidden_chs: int,
            num_classes: int,
            act_layer: type,
            pool_type: str = 'avg',
            drop_rate: float = 0.0,
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv = nn.Conv2d(in_chs, hidden_chs, 1, bias=False, **dd)
        self.norm = nn.BatchNorm2d(hidden_chs, **dd)
        self.act = act_layer()
        self.drop = nn.Dropout(drop_rate)
        self.hidden_chs = hidden_chs
        self.reset(num_classes, pool_type, **dd)

    def reset(self, num_classes: int, pool_type: Optional[str] = None, device=None, dtype=None) -> None:
        self.num_classes = num_classes
        if pool_type is not None:
            _check_pool(pool_type, ('avg', 'max', 'avgmax', 'catavgmax'))
            self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))
        features = self.hidden_chs * self.global_pool.feat_mult()
        self.fc = nn.Linear(features, num_classes, device=device, dtype=dtype) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.global_pool(self.act(self.norm(self.conv(x))))
        x = self.drop(x)
        if pre_logits:
            return x
        _check_pooled(self.global_pool.pool_type, self.num_classes)
        return self.fc(x)


class AttentionPool(nn.Module):
    """Single-query attention pooling of the H/G head (the official ``clip_projector``).

    The query is the mean token; q/k/v have separate bias parameters. Input ``(B, N, dim)``, output ``(B, out_dim)``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            out_dim: int,
            norm_layer: Callable[..., nn.Module],
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.norm_q = norm_layer(dim, **dd)
        self.norm_k = norm_layer(dim, **dd)
        self.norm_v = norm_layer(dim, **dd)
        self.q = nn.Linear(dim, dim, bias=False, **dd)
        self.k = nn.Linear(dim, dim, bias=False, **dd)
        self.v = nn.Linear(dim, dim, bias=False, **dd)
        self.q_bias = nn.Parameter(torch.zeros(dim, **dd))
        self.k_bias = nn.Parameter(torch.zeros(dim, **dd))
        self.v_bias = nn.Parameter(torch.zeros(dim, **dd))
        self.proj = nn.Linear(dim, out_dim, **dd)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        query = self.norm_q(x.mean(1, keepdim=True))
        q = F.linear(query, self.q.weight, self.q_bias).reshape(batch, 1, self.num_heads, head_dim).transpose(1, 2)
        k = F.linear(self.norm_k(x), self.k.weight, self.k_bias)
        v = F.linear(self.norm_v(x), self.v.weight, self.v_bias)
        k = k.reshape(batch, tokens, self.num_heads, head_dim).transpose(1, 2)
        v = v.reshape(batch, tokens, self.num_heads, head_dim).transpose(1, 2)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(batch, dim)
        return self.proj(out)


class AttentionPoolHead(nn.Module):
    """H/G head: attention pooling, norm, dropout, fc. ``pool_type=''`` removes pooling and norm."""

    def __init__(
            self,
            in_chs: int,
            num_classes: int,
            norm_layer: Callable[..., nn.Module],
            pool_type: str = 'attn',
            drop_rate: float = 0.0,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        self.in_chs = in_chs
        self.norm_layer = norm_layer
        self.drop = nn.Dropout(drop_rate)
        self.pool_type = ''
        self.attn_pool = nn.Identity()
        self.norm = nn.Identity()
        self.reset(num_classes, pool_type, device=device, dtype=dtype)

    def reset(self, num_classes: int, pool_type: Optional[str] = None, device=None, dtype=None) -> None:
        dd = {'device': device, 'dtype': dtype}
        self.num_classes = num_classes
        if pool_type is not None and pool_type != self.pool_type:  # keep (pretrained) pooling weights otherwise
            _check_pool(pool_type, ('attn',))
            self.pool_type = pool_type
            if pool_type:
                self.attn_pool = AttentionPool(
                    self.in_chs, _ATTN_POOL_HEADS, _ATTN_POOL_OUT_DIM, self.norm_layer, **dd)
                self.norm = self.norm_layer(_ATTN_POOL_OUT_DIM, **dd)
            else:
                self.attn_pool = nn.Identity()
                self.norm = nn.Identity()
        self.fc = nn.Linear(_ATTN_POOL_OUT_DIM, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.pool_type:
            x = self.norm(self.attn_pool(x.flatten(2).transpose(1, 2)))
        x = self.drop(x)
        if pre_logits:
            return x
        _check_pooled(self.pool_type, self.num_classes)
        return self.fc(x)


class PrunedHead(nn.Module):
    """The head after ``prune_intermediate_layers(prune_head=True)``: the unpooled NCHW features pass through (as
    for timm's own models), and there is no classifier to reset."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Identity()

    def reset(self, num_classes: int, global_pool: Optional[str] = None, device=None, dtype=None) -> None:
        raise RuntimeError(
            'InternImage: the head was removed by prune_intermediate_layers(prune_head=True); create the model '
            'again (timm.create_model) to get a classifier')

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return x


def _check_pool(pool_type: str, allowed: Sequence[str]) -> None:
    if pool_type and pool_type not in allowed:
        raise ValueError(f'global_pool={pool_type!r} is not supported here; use one of {list(allowed) + [""]}')


def _check_num_classes(num_classes: int) -> None:
    if num_classes < 0:
        raise ValueError(f'num_classes={num_classes} is negative; use 0 for no classifier, or the number of classes')


def _check_pooled(pool_type: str, num_classes: int) -> None:
    if not pool_type and num_classes > 0:
        raise ValueError(
            f'the head has no global pooling (global_pool="") but a {num_classes}-class classifier; '
            f'use reset_classifier(0, "") for unpooled features, or pass a global_pool')


class ScaleFusion(nn.Module):
    """H/G neck: 1x1 conv + pixel shuffle on stage 3, plus 1x1 conv on stage 2 (NCHW, stride 16)."""

    def __init__(self, stage2_chs: int, stage3_chs: int, out_chs: int, device=None, dtype=None) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.proj_stage3 = nn.Conv2d(stage3_chs, out_chs * 4, 1, **dd)
        self.upsample = nn.PixelShuffle(2)
        self.proj_stage2 = nn.Conv2d(stage2_chs, out_chs, 1, **dd)

    def forward(self, stage2: Tensor, stage3: Tensor) -> Tensor:
        return self.upsample(self.proj_stage3(stage3)) + self.proj_stage2(stage2)


@register_notrace_function
def check_image_input(x: Tensor, in_chans: int, fuses_stride16: bool) -> None:
    """Raise a ValueError naming the problem and its fix for inputs the model cannot use."""
    if x.dim() != 4:
        raise ValueError(f'InternImage expects a 4-D (N, C, H, W) image batch, got shape {tuple(x.shape)}')
    if x.shape[1] != in_chans and x.shape[-1] == in_chans:
        raise ValueError(
            f'InternImage expects channels first, (N, C, H, W), but got shape {tuple(x.shape)}, which looks like '
            f'channels last (N, H, W, C) with C={in_chans}; pass x.permute(0, 3, 1, 2)')
    if x.shape[1] != in_chans:
        raise ValueError(
            f'InternImage was built for {in_chans} input channels but got {x.shape[1]} '
            f'(shape {tuple(x.shape)}); create it with in_chans={x.shape[1]} or convert the images')
    if x.shape[-2] < 32 or x.shape[-1] < 32:
        raise ValueError(
            f'InternImage needs images of at least 32x32 (its total stride), got {x.shape[-2]}x{x.shape[-1]}; '
            f'upsample or pad the input')
    if fuses_stride16 and (-(-x.shape[-2] // 16) % 2 or -(-x.shape[-1] // 16) % 2):
        raise ValueError(
            f'InternImage-H/G heads fuse stride-16 and stride-32 maps, so ceil(side / 16) must be even; '
            f'got {x.shape[-2]}x{x.shape[-1]}. Resize or pad to a multiple of 32')


class InternImage(nn.Module):
    """InternImage classifier / backbone. The official constructor arguments come first, in the official order."""

    def __init__(
            self,
            core_op: str = 'DCNv3',
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
            dw_kernel_size: Optional[int] = None,
            use_clip_projector: bool = False,
            level2_post_norm: bool = False,
            level2_post_norm_block_ids: Optional[Sequence[int]] = None,
            res_post_norm: bool = False,
            center_feature_scale: bool = False,
            remove_center: bool = False,
            in_chans: int = 3,
            global_pool: Optional[str] = None,
            head_drop_rate: float = 0.0,
            dcn_layer: Optional[Callable[..., nn.Module]] = None,
            mlp_fc2_bias: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            core_op: the core operator, only ``'DCNv3'`` (``timm_internimage.set_backend`` picks its kernel).
            channels: width of stage 0; stage ``i`` has ``channels * 2**i``.
            depths: blocks per stage.
            groups: DCNv3 groups per stage.
            num_classes: classifier outputs (0 for none).
            mlp_ratio: MLP hidden width ratio.
            drop_rate: dropout after the stem and in the MLPs (official semantics).
            drop_path_rate: stochastic depth rate.
            drop_path_type: ``'linear'`` (block rates rising linearly from 0 to ``drop_path_rate``) or
                ``'uniform'`` (``drop_path_rate`` in every block).
            act_layer: official name (``'GELU'``, ``'ReLU'``, ``'SiLU'``), timm activation name, or class.
            norm_layer: official name (``'LN'``: LayerNorm with eps 1e-6, ``'BN'``) or a class normalising the
                last dimension. As officially, it is the norm of the stem, the downsamples, DCNv3's offset/mask
                branch and the H/G head; the blocks' norms are LayerNorms, the T-XL head's a BatchNorm.
            layer_scale: initial value of per-branch layer scale, None for none.
            offset_scale: DCNv3 offset scale (also scales the base kernel grid).
            post_norm: normalise branch outputs instead of inputs.
            cls_scale: T-XL head width as a multiple of the last stage width.
            with_cp: gradient checkpointing of the blocks (as ``set_grad_checkpointing()``).
            dw_kernel_size: kernel of the DCNv3 depthwise conv (default 3).
            use_clip_projector: H/G head (stage 2+3 fusion and attention pooling).
            level2_post_norm, level2_post_norm_block_ids: extra norms after these stage-2 blocks.
            res_post_norm: norm after each pre-normed branch (without post_norm and layer scale).
            center_feature_scale: DCNv3 centre feature scaling.
            remove_center: drop the DCNv3 kernel centre.
            in_chans: input channels.
            global_pool: 'avg' (also 'max', 'avgmax', 'catavgmax') for T-XL, 'attn' for H/G, '' for none.
            head_drop_rate: dropout before the classifier.
            dcn_layer: the blocks' core op module in place of DCNv3 (FlashInternImage passes DCNv4), called as
                ``dcn_layer(dim, group=, offset_scale=, device=, dtype=)``; then ``core_op`` is its name.
            mlp_fc2_bias: bias in the MLPs' second layer.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if dcn_layer is None and core_op != 'DCNv3':
            raise ValueError(
                f"core_op={core_op!r} is not supported; InternImage implements core_op='DCNv3' "
                f"(timm_internimage.set_backend picks its kernel)")
        if len(depths) != 4 or len(groups) != 4:
            raise ValueError(f'InternImage needs 4 stages: got depths={list(depths)}, groups={list(groups)}')
        for i, group in enumerate(groups):
            if (channels * 2 ** i) % group:
                raise ValueError(
                    f'stage {i} has {channels * 2 ** i} channels, not divisible by groups[{i}]={group}; '
                    f'choose groups that divide channels * 2**i')
        _check_num_classes(num_classes)
        if drop_path_type not in ('linear', 'uniform'):
            raise ValueError(f"drop_path_type must be 'linear' or 'uniform', got {drop_path_type!r}")
        act_layer = _resolve_act_layer(act_layer)
        norm_layer = _resolve_norm_layer(norm_layer)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.grad_checkpointing = False

        self.stem = Stem(in_chans, channels, act_layer, norm_layer, **dd)
        self.pos_drop = nn.Dropout(drop_rate)
        num_blocks = sum(depths)
        if drop_path_type == 'uniform':
            dpr = [drop_path_rate] * num_blocks
        else:  # linear from 0 to drop_path_rate (plain Python: the model may be built on the meta device)
            dpr = [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
        stages = []
        self.feature_info = []
        in_chs = channels
        for i, depth in enumerate(depths):
            out_chs = channels * 2 ** i
            first_block = sum(depths[:i])
            stages.append(InternImageStage(
                in_chs, out_chs, depth, groups[i],
                downsample=i > 0,
                drop_path_rates=dpr[first_block:first_block + depth],
                use_norm=not post_norm or center_feature_scale,
                norm_layer=norm_layer,
                out_norm_block_ids=tuple(level2_post_norm_block_ids or ()) if level2_post_norm and i == 2 else (),
                mlp_ratio=mlp_ratio,
                drop=drop_rate,
                act_layer=act_layer,
                post_norm=post_norm,
                layer_scale=layer_scale,
                offset_scale=offset_scale,
                dw_kernel_size=dw_kernel_size,
                res_post_norm=res_post_norm,
                center_feature_scale=center_feature_scale,
                remove_center=remove_center,
                dcn_layer=dcn_layer,
                mlp_fc2_bias=mlp_fc2_bias,
                **dd,
            ))
            self.feature_info.append(dict(num_chs=out_chs, reduction=2 ** (i + 2), module=f'stages.{i}'))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)

        if use_clip_projector:
            self.neck = ScaleFusion(channels * 4, channels * 8, _ATTN_POOL_DIM, **dd)
            self.num_features = _ATTN_POOL_DIM
            self.head_hidden_size = _ATTN_POOL_OUT_DIM
            self.head = AttentionPoolHead(
                self.num_features, num_classes, norm_layer, 'attn' if global_pool is None else global_pool,
                head_drop_rate, **dd)
        else:
            self.neck = None
            self.num_features = channels * 8
            self.head_hidden_size = int(self.num_features * cls_scale)
            self.head = ConvPoolHead(
                self.num_features, self.head_hidden_size, num_classes, act_layer,
                'avg' if global_pool is None else global_pool, head_drop_rate, **dd)
            self.head_hidden_size *= self.head.global_pool.feat_mult()
        if not self.stem.conv1.weight.is_meta:
            self.init_weights()
        if with_cp:
            self.set_grad_checkpointing()

    def init_weights(self) -> None:
        """Official initialisation: truncated normal linears, then DCNv3's (DCNv4's) own reset."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, (DCNv3, DCNv4)):
                module.reset_parameters()

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Layer-scale gammas and attention-pool q/k/v biases."""
        return {n for n, _ in self.named_parameters() if n.endswith(('.gamma', '_bias'))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem|^pos_drop',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^stages\.(\d+)\.norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier (on the model's device and dtype, in its train/eval mode); ``global_pool``
        None keeps the pooling, ``''`` removes it (then use ``num_classes=0``: unpooled NCHW maps)."""
        _check_num_classes(num_classes)
        reference = self.stem.conv1.weight
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, device=reference.device, dtype=reference.dtype)
        self.head.train(self.training)

    def forward_intermediates(
            self,
            x: Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Forward returning stage outputs (after each stage's norm, before the next downsample).

        Args:
            x: Input image tensor.
            indices: Take last n stages if int, all if None, select matching indices if sequence.
            norm: Unused; stage outputs are already normalised where the architecture has norms.
            stop_early: Stop iterating over stages when the last desired intermediate is hit.
            output_fmt: Shape of intermediate feature outputs: 'NCHW' (views of channels-last maps) or 'NHWC'
                (the contiguous channels-last maps the blocks compute, without a permute).
            intermediates_only: Only return intermediate features.

        Returns:
            List of intermediate features or tuple of (final features, intermediates).
        """
        channels_last = _check_output_fmt(output_fmt) == 'NHWC'
        if not torch.jit.is_scripting():  # the fused stride-16 map is only computed for the final features
            check_image_input(x, self.in_chans, self.neck is not None and not intermediates_only)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        x = self.pos_drop(self.stem(x))
        if torch.jit.is_scripting() or not stop_early:
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        stage_outputs: List[Tensor] = []
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            stage_outputs.append(x)
            if feat_idx in take_indices:
                intermediates.append(x.permute(0, 2, 3, 1) if channels_last else x)
        if intermediates_only:
            return intermediates
        return self._finalize_features(stage_outputs), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and head) not needed for the given intermediates."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if max_index < 3:
            self.neck = None
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or max_index < 3:
            self.head = PrunedHead()
            self.num_classes = 0
        return take_indices

    def _finalize_features(self, stage_outputs: List[Tensor]) -> Tensor:
        if self.neck is not None:
            return self.neck(stage_outputs[2], stage_outputs[3])
        return stage_outputs[-1]

    def forward_features(self, x: Tensor) -> Tensor:
        """Unpooled NCHW features: the last stage, or for H/G the fused stride-16 map."""
        if not torch.jit.is_scripting():
            check_image_input(x, self.in_chans, self.neck is not None)
        x = self.pos_drop(self.stem(x))
        stage_outputs: List[Tensor] = []
        for stage in self.stages:
            x = stage(x)
            stage_outputs.append(x)
        return self._finalize_features(stage_outputs)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str) -> None:
        """timm's ``custom_load`` hook: load a sharded checkpoint (its index file, or a folder); see pretrained.py."""
        from ..pretrained import load_sharded_pretrained
        load_sharded_pretrained(self, checkpoint_path, checkpoint_filter_fn)


# Official key -> this implementation's key, in order, after the ``model.`` prefix (Hugging Face) is gone.
_OFFICIAL_KEY_RULES = (
    (r'^patch_embed\.(conv[12])\.', r'stem.\1.'),
    (r'^patch_embed\.(norm[12])\.1\.', r'stem.\1.'),
    (r'^levels\.(\d+)\.(blocks|norm)\.', r'stages.\1.\2.'),
    (r'\.downsample\.norm\.1\.', '.downsample.norm.'),
    (r'\.(norm[12]?|res_post_norm[12])\.0\.', r'.\1.'),
    (r'\.dcn\.dw_conv\.0\.', '.dcn.dw_conv.'),
    (r'\.dcn\.dw_conv\.1\.1\.', '.dcn.dw_norm.'),
    (r'\.dcn\.center_feature_scale_proj_(weight|bias)$', r'.dcn.center_feature_scale_proj.\1'),
    (r'\.(?:gamma|layer_scale)([12])$', r'.ls\1.gamma'),
    (r'^head\.', 'head.fc.'),
    (r'^conv_head\.0\.', 'head.conv.'),
    (r'^conv_head\.1\.0\.', 'head.norm.'),
    (r'^dcnv3_head_x4\.0\.', 'neck.proj_stage3.'),
    (r'^dcnv3_head_x3\.', 'neck.proj_stage2.'),
    (r'^clip_projector\.norm1_([qkv])\.0\.', r'head.attn_pool.norm_\1.'),
    (r'^clip_projector\.cross_dcn\.', 'head.attn_pool.'),
    (r'^fc_norm\.0\.', 'head.norm.'),
)


# The keys checkpoints wrap their weights in, outermost first (mmcv's ``state_dict``, the official and timm
# training ``model``, DataParallel's ``module``), and the prefix of the backbone in an mmdet / mmseg model, whose
# other keys (neck, heads) are dropped.
_CHECKPOINT_WRAPPERS = ('state_dict', 'model', 'module')
_BACKBONE_PREFIX = 'backbone.'
# Key prefixes of a backbone, official and this implementation's: left unmapped, they are an error, not dropped.
_BACKBONE_LIKE_PREFIXES = ('levels.', 'patch_embed.', 'stages.', 'stem.')


def checkpoint_filter_fn(
        state_dict: Dict[str, Any],
        model: InternImage,
        strict: bool = True,
        source: Optional[str] = None,
        head_required: bool = False,
) -> Dict[str, Tensor]:
    """timm's ``pretrained_filter_fn``, which every way of loading weights passes through.

    1. The checkpoint is unwrapped (:func:`backbone_state_dict`): ``state_dict`` / ``model`` / ``module``
       wrappers and ``module.`` key prefixes; of a detection or segmentation checkpoint (``backbone.`` keys) only
       the backbone is kept, and one log line says how many neck and head keys were dropped, under which prefixes.
    2. Official and Hugging Face key names are mapped (:func:`remap_checkpoint_keys`).
    3. The backbone (stem and stages) must be complete: a backbone tensor the checkpoint lacks, or an unmapped key
       that looks like a backbone's (``levels.``, ``patch_embed.``, ``stages.``, ``stem.``) raises
       ``PretrainedWeightsError`` naming the keys and the file (``source``, or the model's pretrained cfg), whatever
       timm's strictness for the head, so a wrong checkpoint never leaves a silently random backbone. Only
       ``strict=False`` (timm's ``pretrained_strict=False``, an explicit request for a partial load) skips the
       check of missing keys. With ``head_required`` (a classifier loading its checkpoint's head strictly), a
       checkpoint without any head key (a detection / segmentation backbone) is an error saying so.
    4. Floating tensors of another dtype than the model's are cast to it (one log line says so); an integer or
       bool tensor for a floating model tensor raises ``PretrainedWeightsError`` naming it.
    """
    backbone = backbone_state_dict(state_dict, log=True)
    state_dict = remap_checkpoint_keys(backbone, model)
    # Unknown keys are reported by their official names (without the Hugging Face ``model.`` prefix).
    checkpoint_names = {key: re.sub(r'^model\.', '', name) for key, name in zip(state_dict, backbone)} \
        if len(state_dict) == len(backbone) else {}
    _check_backbone_keys(state_dict, model, strict, source, checkpoint_names)
    if head_required and not any(k.startswith('head.') for k in state_dict):
        from ..pretrained import PretrainedWeightsError
        raise PretrainedWeightsError(
            f'{source or _checkpoint_source(model)} holds a backbone without a classifier head (a detection or '
            f'segmentation checkpoint): load it as a backbone (features_only=True), or pass num_classes to train '
            f'a new head')
    return _match_float_dtypes(state_dict, model)


def backbone_state_dict(checkpoint: Dict[str, Any], log: bool = False) -> Dict[str, Any]:
    """The weights of a checkpoint in any released layout, with their own key names.

    Unwraps ``state_dict`` (mmcv: mmdet / mmseg), ``model`` (official classification, timm training) and
    ``module``, strips a ``module.`` prefix (DataParallel), and of a checkpoint with ``backbone.`` keys keeps
    those, without the prefix. With ``log``, one log line counts the dropped neck / head keys by prefix.
    """
    for wrapper in _CHECKPOINT_WRAPPERS:
        if isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
    if checkpoint and all(k.startswith('module.') for k in checkpoint):
        checkpoint = {k[len('module.'):]: v for k, v in checkpoint.items()}
    if not any(k.startswith(_BACKBONE_PREFIX) for k in checkpoint):
        return checkpoint
    backbone, dropped = {}, {}
    for k, v in checkpoint.items():
        if k.startswith(_BACKBONE_PREFIX):
            backbone[k[len(_BACKBONE_PREFIX):]] = v
        else:
            prefix = k.partition('.')[0] + '.'
            dropped[prefix] = dropped.get(prefix, 0) + 1
    if log and dropped:
        _logger.info(
            'Loading the backbone of a detection/segmentation checkpoint: dropped %d neck/head keys (%s)',
            sum(dropped.values()), ', '.join(dropped))
    return backbone


def _checkpoint_source(model: nn.Module) -> str:
    """The weights file a model's pretrained cfg names, for error messages."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    if cfg.get('file'):
        return str(cfg['file'])
    if cfg.get('hf_hub_id'):
        return '/'.join(part for part in (cfg['hf_hub_id'], cfg.get('hf_hub_filename')) if part)
    return 'the checkpoint'


def _quoted_keys(keys: List[str], limit: int = 12) -> str:
    shown = ', '.join(f'"{k}"' for k in keys[:limit])
    return shown + (f', ... ({len(keys) - limit} more)' if len(keys) > limit else '')


def _check_backbone_keys(
        state_dict: Dict[str, Any],
        model: InternImage,
        strict: bool,
        source: Optional[str],
        checkpoint_names: Dict[str, str],
) -> None:
    """Raise ``PretrainedWeightsError`` for missing backbone tensors (unless ``strict`` is False) or unknown keys
    that look like a backbone's (named as in the checkpoint: ``checkpoint_names`` maps them back)."""
    from ..pretrained import PretrainedWeightsError
    own = model.state_dict()
    backbone = [k for k in own if k.startswith(('stem.', 'stages.'))]
    missing = [k for k in backbone if k not in state_dict] if strict else []
    unknown = [checkpoint_names.get(k, k) for k in state_dict
               if k not in own and k.startswith(_BACKBONE_LIKE_PREFIXES)]
    if not missing and not unknown:
        return
    problems = []
    if missing:
        problems.append(f'Missing key(s) in the backbone ({len(missing)} of {len(backbone)}): {_quoted_keys(missing)}.')
    if unknown:
        problems.append(f'Unexpected key(s) that look like a backbone\'s ({len(unknown)}): {_quoted_keys(unknown)}.')
    raise PretrainedWeightsError(
        f'{source or _checkpoint_source(model)} does not hold the backbone of this '
        f'{type(model).__name__} ({model.feature_info[-1]["num_chs"] // 8} channels, depths '
        f'{[len(stage.blocks) for stage in model.stages]}): ' + ' '.join(problems) +
        ' Pass the model arguments of the checkpoint\'s config (a detection/segmentation tag applies them), or '
        'use a checkpoint of this architecture.')


def remap_checkpoint_keys(state_dict: Dict[str, Any], model: InternImage) -> Dict[str, Any]:
    """Map an official checkpoint (classification ``.pth``, mmdet / mmseg ``.pth``: see :func:`backbone_state_dict`)
    or a Hugging Face one (``model.`` prefix, ``layer_scale1/2``) to this model's keys; this implementation's own
    keys pass as they are. Tensors pass untouched."""
    state_dict = backbone_state_dict(state_dict)
    if 'stem.conv1.weight' in state_dict:
        return state_dict
    # The k-th official stage-2 post norm is the out_norm of the k-th stage-2 block that has one.
    normed = [i for i, block in enumerate(model.stages[2].blocks) if not isinstance(block.out_norm, nn.Identity)]
    post_norms = {f'levels.2.post_norms.{k}.0.': f'stages.2.blocks.{i}.out_norm.' for k, i in enumerate(normed)}
    out_dict = {}
    for k, v in state_dict.items():
        k = re.sub(r'^model\.', '', k)
        k = re.sub(r'^levels\.2\.post_norms\.\d+\.0\.', lambda m: post_norms.get(m[0], m[0]), k)
        k = re.sub(r'^levels\.(\d+)\.downsample\.', lambda m: f'stages.{int(m[1]) + 1}.downsample.', k)
        for pattern, replacement in _OFFICIAL_KEY_RULES:
            k = re.sub(pattern, replacement, k)
        out_dict[k] = v
    return out_dict


def _match_float_dtypes(state_dict: Dict[str, Any], model: InternImage) -> Dict[str, Any]:
    """Cast floating checkpoint tensors to the dtype of the model tensors they load into; refuse non-float ones."""
    from ..pretrained import PretrainedWeightsError
    model_tensors = model.state_dict()
    casts: Dict[Tuple[torch.dtype, torch.dtype], int] = {}
    matched = {}
    for key, value in state_dict.items():
        target = model_tensors.get(key)
        if isinstance(value, Tensor) and target is not None and target.is_floating_point() \
                and value.dtype != target.dtype:
            if not value.is_floating_point():
                raise PretrainedWeightsError(
                    f'checkpoint tensor {key!r} is {value.dtype} but the model expects {target.dtype}: non-float '
                    f'(quantized or corrupt) weights cannot be loaded into float parameters; use a float checkpoint')
            casts[value.dtype, target.dtype] = casts.get((value.dtype, target.dtype), 0) + 1
            value = value.to(target.dtype)
        matched[key] = value
    if casts:
        counts = ', '.join(f'{count} {source} -> {target}' for (source, target), count in casts.items())
        _logger.warning("Cast checkpoint tensors to the model's dtype: %s", counts)
    return matched


def _create_internimage(
        variant: str, pretrained: bool, model_args: Dict[str, Any], **kwargs: Any) -> InternImage:
    return build_with_pretrained(InternImage, variant, pretrained, model_args, DENSE_TAGS, **kwargs)


def build_with_pretrained(
        model_cls: type,
        variant: str,
        pretrained: bool,
        model_args: Dict[str, Any],
        dense_tags: Dict[str, 'DenseTag'],
        **kwargs: Any,
) -> InternImage:
    """Build an InternImage-family model (``model_cls`` with the entrypoint's ``model_args``) through timm's
    ``build_model_with_cfg``; the pretrained cfg is resolved once, here.

    A detection / segmentation tag (in the family's ``dense_tags``) applies its checkpoint's model arguments over
    ``model_args`` and makes its config's ``out_indices`` the ``features_only`` default; explicit keyword arguments
    win over both (which is why the entrypoints pass ``model_args`` apart from ``kwargs``). ``output_fmt='NHWC'``
    with ``features_only`` returns channels-last taps. ``pretrained_strict=False`` allows a checkpoint without
    parts of the backbone (see :func:`checkpoint_filter_fn`); without it a missing backbone tensor is an error.
    """
    from ..pretrained import fetch_pretrained, official_checkpoint_globals
    pretrained_cfg = resolve_pretrained_cfg(
        variant, kwargs.pop('pretrained_cfg', None), kwargs.pop('pretrained_cfg_overlay', None))
    dense = dense_tags.get(f'{variant}.{pretrained_cfg.tag}')
    if pretrained:  # its weights are fetched and checked (pretrained.py), then the build takes the cfg as it is
        pretrained_cfg = fetch_pretrained(pretrained_cfg, kwargs.get('cache_dir'))
    strict = kwargs.pop('pretrained_strict', True)
    # A backbone checkpoint (num_classes 0: detection, segmentation) has no head to be strict about; a classifier
    # that keeps its checkpoint's head needs one. checkpoint_filter_fn checks the backbone in every case.
    timm_strict = strict and pretrained_cfg.num_classes != 0
    head_required = timm_strict and not kwargs.get('features_only') \
        and kwargs.get('num_classes', pretrained_cfg.num_classes) == pretrained_cfg.num_classes
    feature_cfg = dict(out_indices=dense.out_indices if dense else (0, 1, 2, 3), feature_cls='getter')
    feature_cfg.update(kwargs.pop('feature_cfg', None) or {})
    if 'output_fmt' in kwargs:
        if not kwargs.get('features_only'):
            raise ValueError("output_fmt applies to features_only models; for a model, pass output_fmt to "
                             "forward_intermediates")
        feature_cfg['output_fmt'] = _check_output_fmt(kwargs.pop('output_fmt'))
    with official_checkpoint_globals():
        return build_model_with_cfg(
            model_cls, variant, pretrained,
            pretrained_cfg=pretrained_cfg,
            pretrained_filter_fn=partial(checkpoint_filter_fn, strict=strict, head_required=head_required),
            pretrained_strict=timm_strict,
            feature_cfg=feature_cfg,
            **{**model_args, **(dense.model_args if dense else {}), **kwargs},
        )


def official_eval_cfg(img_size: int, stride: int = 32) -> Dict[str, Any]:
    """The pretrained-cfg fields of every official classifier of both families: the official evaluation
    preprocessing (short side resized, centre crop 1.0, bicubic, ImageNet mean/std), sizes, first conv, classifier,
    licence. ``stride``: of the map the head pools (16 for H/G's fused map)."""
    return dict(
        input_size=(3, img_size, img_size),
        pool_size=(img_size // stride, img_size // stride),
        min_input_size=(3, 32, 32),
        crop_pct=1.0,
        crop_mode='center',
        interpolation='bicubic',
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv='stem.conv1',
        classifier='head.fc',
        license='mit',
    )


_REPO_URL = 'https://github.com/OpenGVLab/InternImage'
_PAPER = dict(
    paper_ids='arXiv:2211.05778',
    paper_name='InternImage: Exploring Large-Scale Vision Foundation Models with Deformable Convolutions',
)


def _cfg(repo_id: str, img_size: int = 224, num_classes: int = 1000, pool_stride: int = 32) -> Dict[str, Any]:
    """Pretrained cfg of the weights in the Hub repo ``repo_id``: the official evaluation preprocessing, and the Hub
    weights as ``weights_manifest.json`` records them (revision, file layout, published top-1). ``pool_stride``:
    of the map the head pools (16 for H/G, whose head fuses stages 2 and 3)."""
    top1 = repo_entry(repo_id)['top1']
    return dict(
        hub_source(repo_id),
        **official_eval_cfg(img_size, pool_stride),
        num_classes=num_classes,
        description=f'ImageNet-1k top-1 {top1}% (published)' if top1 else f'{num_classes}-class ImageNet-22k head',
        **_PAPER,
        origin_url=_REPO_URL,
    )


_CLASSIFICATION_CFGS = {
    'internimage_t.in1k': _cfg('OpenGVLab/internimage_t_1k_224'),
    'internimage_s.in1k': _cfg('OpenGVLab/internimage_s_1k_224'),
    'internimage_b.in1k': _cfg('OpenGVLab/internimage_b_1k_224'),
    'internimage_l.in22k_ft_in1k_384': _cfg('OpenGVLab/internimage_l_22kto1k_384', img_size=384),
    'internimage_l.in22k_384': _cfg('OpenGVLab/internimage_l_22k_384', img_size=384, num_classes=21841),
    'internimage_xl.in22k_ft_in1k_384': _cfg('OpenGVLab/internimage_xl_22kto1k_384', img_size=384),
    'internimage_xl.in22k_384': _cfg('OpenGVLab/internimage_xl_22k_384', img_size=384, num_classes=21841),
    'internimage_h.joint_in22k_ft_in1k_640': _cfg(
        'OpenGVLab/internimage_h_22kto1k_640', img_size=640, pool_stride=16),
    'internimage_h.joint_in22k_384': _cfg(
        'OpenGVLab/internimage_h_jointto22k_384', img_size=384, num_classes=21841, pool_stride=16),
    'internimage_g.joint_in22k_ft_in1k_512': _cfg(
        'OpenGVLab/internimage_g_22kto1k_512', img_size=512, pool_stride=16),
    'internimage_g.joint_in22k_384': _cfg(
        'OpenGVLab/internimage_g_jointto22k_384', img_size=384, num_classes=21841, pool_stride=16),
}


class DenseTag(NamedTuple):
    """A released detection / segmentation checkpoint of a family (InternImage: OpenGVLab/InternImage; FlashInternImage:
    OpenGVLab/DCNv4), as a ``features_only`` backbone."""
    filename: str  # on the family's Hub repo (DENSE_REPO); named after the official config (``config``), mostly
    config: str  # detection/configs/<dataset>/<config> or segmentation/configs/<dataset>/<config>
    recipe: str  # dataset and method, for the description
    input_size: Tuple[int, int]  # (height, width): the training crop, or the detectors' test scale
    model_args: Dict[str, Any]  # the config's backbone arguments that differ from the classification variant
    out_indices: Tuple[int, ...] = (0, 1, 2, 3)
    test_input_size: Optional[Tuple[int, int]] = None


DENSE_REPO = 'OpenGVLab/InternImage'
_DET = 'detection/configs/coco/'
_ADE = 'segmentation/configs/ade20k/'
_CITY = 'segmentation/configs/cityscapes/'
_COCO_SIZE = (800, 1333)  # mmdet's test scale: short side 800, long side at most 1333
_CITY_SIZE, _CITY_TEST_SIZE = (512, 1024), (1024, 2048)
# The det/seg configs of T-XL set layer_scale=1.0 (the classification T has no layer scale: its blocks then lack
# gamma1/gamma2); the H config has no clip projector (a plain backbone, no classification head).
_LS = dict(layer_scale=1.0)

# ``model.tag`` -> checkpoint. Tags: ``<dataset>_<method>_<schedule or crop>``, as the official tables name them.
DENSE_TAGS = {
    'internimage_t.coco_mask_rcnn_1x': DenseTag(
        'mask_rcnn_internimage_t_fpn_1x_coco.pth', _DET + 'mask_rcnn_internimage_t_fpn_1x_coco.py',
        'COCO Mask R-CNN 1x', _COCO_SIZE, _LS),
    'internimage_t.coco_mask_rcnn_3x': DenseTag(
        'mask_rcnn_internimage_t_fpn_3x_coco.pth', _DET + 'mask_rcnn_internimage_t_fpn_3x_coco.py',
        'COCO Mask R-CNN 3x', _COCO_SIZE, _LS),
    'internimage_t.coco_dino_1x': DenseTag(
        'dino_4scale_internimage_t_1x_coco.pth', _DET + 'dino_4scale_internimage_t_1x_coco_layer_wise_lr.py',
        'COCO DINO 4-scale 1x, layer-wise lr', _COCO_SIZE, _LS, (1, 2, 3)),
    'internimage_t.ade20k_upernet_512': DenseTag(
        'upernet_internimage_t_512_160k_ade20k.pth', _ADE + 'upernet_internimage_t_512_160k_ade20k.py',
        'ADE20K UperNet 160k', (512, 512), _LS),
    'internimage_t.cityscapes_upernet_512x1024': DenseTag(
        'upernet_internimage_t_512x1024_160k_cityscapes.pth',
        _CITY + 'upernet_internimage_t_512x1024_160k_cityscapes.py',
        'Cityscapes UperNet 160k', _CITY_SIZE, _LS, test_input_size=_CITY_TEST_SIZE),
    'internimage_s.coco_mask_rcnn_1x': DenseTag(
        'mask_rcnn_internimage_s_fpn_1x_coco.pth', _DET + 'mask_rcnn_internimage_s_fpn_1x_coco.py',
        'COCO Mask R-CNN 1x', _COCO_SIZE, _LS),
    'internimage_s.coco_mask_rcnn_3x': DenseTag(
        'mask_rcnn_internimage_s_fpn_3x_coco.pth', _DET + 'mask_rcnn_internimage_s_fpn_3x_coco.py',
        'COCO Mask R-CNN 3x', _COCO_SIZE, _LS),
    'internimage_s.ade20k_upernet_512': DenseTag(
        'upernet_internimage_s_512_160k_ade20k.pth', _ADE + 'upernet_internimage_s_512_160k_ade20k.py',
        'ADE20K UperNet 160k', (512, 512), _LS),
    'internimage_s.cityscapes_upernet_512x1024': DenseTag(
        'upernet_internimage_s_512x1024_160k_cityscapes.pth',
        _CITY + 'upernet_internimage_s_512x1024_160k_cityscapes.py',
        'Cityscapes UperNet 160k', _CITY_SIZE, _LS, test_input_size=_CITY_TEST_SIZE),
    'internimage_b.coco_mask_rcnn_1x': DenseTag(
        'mask_rcnn_internimage_b_fpn_1x_coco.pth', _DET + 'mask_rcnn_internimage_b_fpn_1x_coco.py',
        'COCO Mask R-CNN 1x', _COCO_SIZE, _LS),
    'internimage_b.coco_mask_rcnn_3x': DenseTag(
        'mask_rcnn_internimage_b_fpn_3x_coco.pth', _DET + 'mask_rcnn_internimage_b_fpn_3x_coco.py',
        'COCO Mask R-CNN 3x', _COCO_SIZE, _LS),
    'internimage_b.ade20k_upernet_512': DenseTag(
        'upernet_internimage_b_512_160k_ade20k.pth', _ADE + 'upernet_internimage_b_512_160k_ade20k.py',
        'ADE20K UperNet 160k', (512, 512), _LS),
    'internimage_b.cityscapes_upernet_512x1024': DenseTag(
        'upernet_internimage_b_512x1024_160k_cityscapes.pth',
        _CITY + 'upernet_internimage_b_512x1024_160k_cityscapes.py',
        'Cityscapes UperNet 160k', _CITY_SIZE, _LS, test_input_size=_CITY_TEST_SIZE),
    'internimage_l.coco_cascade_1x': DenseTag(
        'cascade_internimage_l_fpn_1x_coco.pth', _DET + 'cascade_internimage_l_fpn_1x_coco.py',
        'COCO Cascade Mask R-CNN 1x', _COCO_SIZE, _LS),
    'internimage_l.coco_cascade_3x': DenseTag(
        'cascade_internimage_l_fpn_3x_coco.pth', _DET + 'cascade_internimage_l_fpn_3x_coco.py',
        'COCO Cascade Mask R-CNN 3x', _COCO_SIZE, _LS),
    'internimage_l.coco_dino_1x': DenseTag(
        'dino_4scale_internimage_l_1x_coco_layer_wise_lr.pth',
        _DET + 'dino_4scale_internimage_l_1x_coco_layer_wise_lr.py',
        'COCO DINO 4-scale 1x, layer-wise lr', _COCO_SIZE, _LS, (1, 2, 3)),
    'internimage_l.coco_dino_1x_backbone_lr0p1': DenseTag(
        'dino_4scale_internimage_l_1x_coco_0.1x_backbone_lr.pth',
        _DET + 'dino_4scale_internimage_l_1x_coco_0.1x_backbone_lr.py',
        'COCO DINO 4-scale 1x, 0.1x backbone lr', _COCO_SIZE, _LS, (1, 2, 3)),
    'internimage_l.ade20k_upernet_640': DenseTag(
        'upernet_internimage_l_640_160k_ade20k.pth', _ADE + 'upernet_internimage_l_640_160k_ade20k.py',
        'ADE20K UperNet 160k', (640, 640), _LS),
    'internimage_l.cityscapes_upernet_512x1024': DenseTag(
        'upernet_internimage_l_512x1024_160k_cityscapes.pth',
        _CITY + 'upernet_internimage_l_512x1024_160k_cityscapes.py',
        'Cityscapes UperNet 160k', _CITY_SIZE, _LS, test_input_size=_CITY_TEST_SIZE),
    'internimage_l.mapillary_ft_cityscapes_upernet_512x1024': DenseTag(
        'upernet_internimage_l_512x1024_160k_mapillary2cityscapes.pth',
        _CITY + 'upernet_internimage_l_512x1024_160k_mapillary2cityscapes.py',
        'Mapillary -> Cityscapes UperNet 160k', _CITY_SIZE, _LS, test_input_size=_CITY_TEST_SIZE),
    'internimage_xl.coco_cascade_1x': DenseTag(
        'cascade_internimage_xl_fpn_1x_coco.pth', _DET + 'cascade_internimage_xl_fpn_1x_coco.py',
        'COCO Cascade Mask R-CNN 1x', _COCO_SIZE, _LS),
    'internimage_xl.coco_cascade_3x': DenseTag(
        'cascade_internimage_xl_fpn_3x_coco.pth', _DET + 'cascade_internimage_xl_fpn_3x_coco.py',
        'COCO Cascade Mask R-CNN 3x', _COCO_SIZE, _LS),
    'internimage_xl.ade20k_upernet_640': DenseTag(
        'upernet_internimage_xl_640_160k_ade20k.pth', _ADE + 'upernet_internimage_xl_640_160k_ade20k.py',
        'ADE20K UperNet 160k', (640, 640), _LS),
    'internimage_xl.cityscapes_upernet_512x1024': DenseTag(
        'upernet_internimage_xl_512x1024_160k_cityscapes.pth',
        _CITY + 'upernet_internimage_xl_512x1024_160k_cityscapes.py',
        'Cityscapes UperNet 160k', _CITY_SIZE, _LS, test_input_size=_CITY_TEST_SIZE),
    'internimage_xl.mapillary_ft_cityscapes_upernet_512x1024': DenseTag(
        'upernet_internimage_xl_512x1024_160k_mapillary2cityscapes.pth',
        _CITY + 'upernet_internimage_xl_512x1024_160k_mapillary2cityscapes.py',
        'Mapillary -> Cityscapes UperNet 160k', _CITY_SIZE, _LS, test_input_size=_CITY_TEST_SIZE),
    'internimage_h.ade20k_upernet_896': DenseTag(
        'upernet_internimage_h_896_160k_ade20k.pth', _ADE + 'upernet_internimage_h_896_160k_ade20k.py',
        'ADE20K UperNet 160k', (896, 896), dict(use_clip_projector=False)),
}


def dense_scores(filename: str, repo_id: str = DENSE_REPO) -> Dict[str, float]:
    """The published scores of a detection / segmentation checkpoint (``weights_manifest.json``)."""
    return published_results(repo_id, filename)['scores']


def dense_cfg(tag: DenseTag, repo_id: str, **paper: str) -> Dict[str, Any]:
    """Pretrained cfg of a detection / segmentation backbone of the Hub repo ``repo_id``: no classifier, the
    recipe's input size, the official ``.pth`` (loaded ``weights_only``; its neck and head are dropped).
    ``paper``: the family's ``paper_ids``, ``paper_name`` and ``origin_url``."""
    height, width = tag.input_size
    scores = ', '.join(f'{name} {value}' for name, value in dense_scores(tag.filename, repo_id).items())
    return dict(
        hf_hub_id=hub_source(repo_id)['hf_hub_id'],
        hf_hub_filename=tag.filename,
        num_classes=0,
        input_size=(3, height, width),
        test_input_size=(3, *tag.test_input_size) if tag.test_input_size else None,
        pool_size=(height // 32, width // 32),
        min_input_size=(3, 32, 32),
        crop_pct=1.0,
        crop_mode='center',
        interpolation='bilinear',  # mmcv's resize
        mean=IMAGENET_DEFAULT_MEAN,  # the configs' img_norm_cfg (123.675, 116.28, 103.53) / 255, RGB
        std=IMAGENET_DEFAULT_STD,
        first_conv='stem.conv1',
        classifier='head.fc',
        license='mit',
        description=f'{tag.recipe} backbone: {scores} (published)',
        notes=(f'config: {tag.config}', f'out_indices: {tag.out_indices}'),
        **paper,
    )


# The first tag of a model is its default: the classification tags come first.
default_cfgs = generate_default_cfgs({**_CLASSIFICATION_CFGS, **{
    name: dense_cfg(tag, DENSE_REPO, **_PAPER, origin_url=f'{_REPO_URL}/blob/master/{tag.config}')
    for name, tag in DENSE_TAGS.items()}})


def _check_output_fmt(output_fmt: str) -> str:
    if output_fmt not in ('NCHW', 'NHWC'):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
    return output_fmt


@register_model
def internimage_t(pretrained: bool = False, **kwargs: Any) -> InternImage:
    """InternImage-T"""
    model_args = dict(
        channels=64, depths=(4, 4, 18, 4), groups=(4, 8, 16, 32), offset_scale=1.0)
    return _create_internimage('internimage_t', pretrained, model_args, **kwargs)


@register_model
def internimage_s(pretrained: bool = False, **kwargs: Any) -> InternImage:
    """InternImage-S"""
    model_args = dict(
        channels=80, depths=(4, 4, 21, 4), groups=(5, 10, 20, 40), layer_scale=1e-5, offset_scale=1.0,
        post_norm=True)
    return _create_internimage('internimage_s', pretrained, model_args, **kwargs)


@register_model
def internimage_b(pretrained: bool = False, **kwargs: Any) -> InternImage:
    """InternImage-B"""
    model_args = dict(
        channels=112, depths=(4, 4, 21, 4), groups=(7, 14, 28, 56), layer_scale=1e-5, offset_scale=1.0,
        post_norm=True)
    return _create_internimage('internimage_b', pretrained, model_args, **kwargs)


@register_model
def internimage_l(pretrained: bool = False, **kwargs: Any) -> InternImage:
    """InternImage-L"""
    model_args = dict(
        channels=160, depths=(5, 5, 22, 5), groups=(10, 20, 40, 80), layer_scale=1e-5, offset_scale=2.0,
        post_norm=True)
    return _create_internimage('internimage_l', pretrained, model_args, **kwargs)


@register_model
def internimage_xl(pretrained: bool = False, **kwargs: Any) -> InternImage:
    """InternImage-XL"""
    model_args = dict(
        channels=192, depths=(5, 5, 24, 5), groups=(12, 24, 48, 96), layer_scale=1e-5, offset_scale=2.0,
        post_norm=True)
    return _create_internimage('internimage_xl', pretrained, model_args, **kwargs)


@register_model
def internimage_h(pretrained: bool = False, **kwargs: Any) -> InternImage:
    """InternImage-H"""
    model_args = dict(
        channels=320, depths=(6, 6, 32, 6), groups=(10, 20, 40, 80), offset_scale=1.0, dw_kernel_size=5,
        res_post_norm=True, level2_post_norm=True, level2_post_norm_block_ids=(5, 11, 17, 23, 29),
        center_feature_scale=True, use_clip_projector=True)
    return _create_internimage('internimage_h', pretrained, model_args, **kwargs)


@register_model
def internimage_g(pretrained: bool = False, **kwargs: Any) -> InternImage:
    """InternImage-G"""
    model_args = dict(
        channels=512, depths=(2, 2, 48, 4), groups=(16, 32, 64, 128), offset_scale=1.0, dw_kernel_size=5,
        post_norm=True, level2_post_norm=True, level2_post_norm_block_ids=(5, 11, 17, 23, 29, 35, 41, 47),
        center_feature_scale=True, use_clip_projector=True)
    return _create_internimage('internimage_g', pretrained, model_args, **kwargs)
