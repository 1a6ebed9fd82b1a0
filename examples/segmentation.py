#!/usr/bin/env python3
"""Semantic segmentation with an InternImage backbone: a light FPN head on the four ``features_only`` taps.

The backbone comes from a segmentation tag (the official ADE20K UperNet backbone, ``internimage_t.ade20k_upernet_512``
by default); the head (lateral 1x1 convs, top-down sum, a 3x3 conv on each level, all upsampled to stride 4 and
summed, then a 1x1 classifier: Panoptic-FPN's semantic branch in miniature) is trained for a few steps on generated
images (coloured rectangles on noise, one class per colour), then run on a photo, printing the share of each class::

    python examples/segmentation.py --steps 50
    python examples/segmentation.py --image my_photo.jpg --model internimage_b.ade20k_upernet_512

The channels-last taps (``output_fmt='NHWC'``) would suit a head written for NHWC; this one uses NCHW convs.
"""
import argparse
import json
import random
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import timm
import timm_internimage  # noqa: F401  (registers the models)

CLASSES = ('background', 'red', 'green', 'blue')
COLOURS = ((220, 40, 40), (40, 200, 60), (40, 80, 230))


class FPNSegmenter(nn.Module):
    """``features_only`` InternImage + a light FPN head; logits at the input resolution."""

    def __init__(self, model_name: str, num_classes: int = len(CLASSES), pretrained: bool = True,
                 head_channels: int = 64, **model_kwargs: Any) -> None:
        super().__init__()
        self.backbone = timm.create_model(model_name, features_only=True, pretrained=pretrained, **model_kwargs)
        channels = self.backbone.feature_info.channels()
        self.lateral = nn.ModuleList(nn.Conv2d(c, head_channels, 1) for c in channels)
        self.smooth = nn.ModuleList(nn.Sequential(
            nn.Conv2d(head_channels, head_channels, 3, padding=1, bias=False),
            nn.GroupNorm(8, head_channels), nn.ReLU(inplace=True)) for _ in channels)
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        cfg = self.backbone.pretrained_cfg
        self.register_buffer('mean', torch.tensor(cfg['mean']).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(cfg['std']).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """``images``: float (N, 3, H, W) in [0, 1], sides multiples of 32; returns (N, classes, H, W) logits."""
        taps = self.backbone((images - self.mean) / self.std)
        levels = [lateral(tap) for lateral, tap in zip(self.lateral, taps)]
        for i in range(len(levels) - 2, -1, -1):  # top-down
            levels[i] = levels[i] + F.interpolate(levels[i + 1], size=levels[i].shape[-2:], mode='nearest')
        size = levels[0].shape[-2:]
        fused = sum(F.interpolate(smooth(level), size=size, mode='bilinear', align_corners=False)
                    for smooth, level in zip(self.smooth, levels))
        return F.interpolate(self.classifier(fused), size=images.shape[-2:], mode='bilinear', align_corners=False)


def make_batch(batch_size: int, size: Tuple[int, int] = (128, 128), rng: Optional[random.Random] = None
               ) -> Tuple[Tensor, Tensor]:
    """Images (N, 3, H, W) in [0, 1] with 1-3 coloured rectangles on noise, and their class maps (N, H, W)."""
    rng = rng or random.Random(0)
    height, width = size
    generator = torch.Generator().manual_seed(rng.randrange(2 ** 31))
    images = torch.rand(batch_size, 3, height, width, generator=generator) * 0.25 + 0.35
    targets = torch.zeros(batch_size, height, width, dtype=torch.int64)
    for n in range(batch_size):
        for _ in range(rng.randint(1, 3)):
            label = rng.randrange(len(COLOURS))
            h, w = rng.randint(height // 6, height // 2), rng.randint(width // 6, width // 2)
            y, x = rng.randint(0, height - h), rng.randint(0, width - w)
            images[n, :, y:y + h, x:x + w] = torch.tensor(COLOURS[label]).view(3, 1, 1) / 255
            targets[n, y:y + h, x:x + w] = label + 1
    return images, targets


def train(model: FPNSegmenter, steps: int, lr: float = 1e-4, batch_size: int = 2,
          size: Tuple[int, int] = (128, 128), log_every: int = 10) -> List[float]:
    """``steps`` AdamW updates of the per-pixel cross-entropy; the backbone at a tenth of the head's rate."""
    model.train()
    backbone = list(model.backbone.parameters())
    backbone_ids = {id(p) for p in backbone}
    head = [p for p in model.parameters() if id(p) not in backbone_ids]
    optimizer = torch.optim.AdamW([{'params': backbone, 'lr': lr * 0.1}, {'params': head, 'lr': lr}])
    rng, losses = random.Random(0), []
    for step in range(steps):
        images, targets = make_batch(batch_size, size, rng)
        loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f'step {step + 1}: loss {loss.item():.3f}')
    return losses


@torch.no_grad()
def segment(model: FPNSegmenter, image_path, side: int = 256) -> Tensor:
    """The class map (H, W) of a photo resized to ``side`` x ``side`` (a multiple of 32)."""
    from PIL import Image
    model.eval()
    image = Image.open(image_path).convert('RGB').resize((side, side), Image.BILINEAR)
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(side, side, 3)
    return model(data.permute(2, 0, 1)[None].float() / 255)[0].argmax(0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='internimage_t.ade20k_upernet_512',
                        help='a segmentation tag (see `python -m timm_internimage list`)')
    parser.add_argument('--no-pretrained', action='store_true', help='random backbone (no download)')
    parser.add_argument('--model-args', default='{}', help='JSON keyword arguments of timm.create_model')
    parser.add_argument('--steps', type=int, default=30)
    parser.add_argument('--lr', type=float, default=1e-4)
    parser.add_argument('--image', default=None, help='photo to run on (default: the bundled cat)')
    args = parser.parse_args(argv)

    model = FPNSegmenter(args.model, pretrained=not args.no_pretrained, **json.loads(args.model_args))
    losses = train(model, args.steps, args.lr)
    print(f'trained {len(losses)} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}')
    from timm_internimage.tools.images import sample_image_path
    classes = segment(model, args.image or sample_image_path())
    shares = torch.bincount(classes.flatten(), minlength=len(CLASSES)).float() / classes.numel()
    print('class shares: ' + ', '.join(f'{name} {share:.1%}' for name, share in zip(CLASSES, shares.tolist())))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
