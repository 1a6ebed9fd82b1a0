#!/usr/bin/env python3
"""Object detection with an InternImage backbone: torchvision's Mask R-CNN over ``features_only`` InternImage.

The backbone comes from a detection tag (the official COCO Mask R-CNN backbone, ``internimage_t.coco_mask_rcnn_1x``
by default), an FPN turns its four taps (strides 4-32) into the five maps torchvision's RPN and RoI heads expect,
and the detector is fine-tuned for a few steps on a small COCO-format dataset this script generates (coloured
rectangles on noise, one class per colour), then run on a photo, printing the boxes it finds::

    python examples/detection.py --steps 50 --out runs/detection
    python examples/detection.py --image my_photo.jpg --model internimage_s.coco_mask_rcnn_3x

The neck and heads start from torchvision's initialisation (the official checkpoints' mmdet heads are not
loaded): the point is the wiring. The optimizer applies layer-wise learning-rate decay to the backbone through
timm's ``param_groups_layer_decay`` (InternImage's ``group_matcher``: stem, then blocks stage by stage), and the
full learning rate to the neck and heads.
"""
import argparse
import json
import math
import random
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

import timm
import timm_internimage  # noqa: F401  (registers the models)
from timm.optim import param_groups_layer_decay

COLOURS = {'red': (220, 40, 40), 'green': (40, 200, 60), 'blue': (40, 80, 230)}


class InternImageFPN(nn.Module):
    """``features_only`` InternImage + torchvision's FPN: an ``OrderedDict`` of ``out_channels`` maps, the last one
    an extra max-pooled level (what torchvision's detection heads take as a backbone)."""

    def __init__(self, model_name: str, pretrained: bool = True, out_channels: int = 256, **model_kwargs: Any):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
        self.body = timm.create_model(model_name, features_only=True, pretrained=pretrained, **model_kwargs)
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), out_channels, LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> 'OrderedDict[str, Tensor]':
        return self.fpn(OrderedDict((str(i), tap) for i, tap in enumerate(self.body(x))))


def build_detector(
        model_name: str = 'internimage_t.coco_mask_rcnn_1x',
        num_classes: int = len(COLOURS) + 1,
        pretrained: bool = True,
        min_size: int = 800,
        max_size: int = 1333,
        fpn_channels: int = 256,
        detector_kwargs: Optional[Dict[str, Any]] = None,
        **model_kwargs: Any,
):
    """torchvision ``MaskRCNN`` (``num_classes`` including the background; ``detector_kwargs`` for its other
    arguments) on an InternImage FPN of ``fpn_channels`` (``model_kwargs`` for ``timm.create_model``); images are
    normalised with the backbone's mean and std and resized to ``min_size`` / ``max_size``."""
    from torchvision.models.detection import MaskRCNN
    backbone = InternImageFPN(model_name, pretrained, fpn_channels, **model_kwargs)
    if len(backbone.body.feature_info.channels()) != 4:
        raise ValueError(f'{model_name} taps {backbone.body.feature_info.out_indices}; Mask R-CNN here needs the '
                         f'four stages (pass out_indices=(0, 1, 2, 3))')
    cfg = backbone.body.pretrained_cfg
    return MaskRCNN(backbone, num_classes=num_classes, min_size=min_size, max_size=max_size,
                    image_mean=list(cfg['mean']), image_std=list(cfg['std']), **(detector_kwargs or {}))


def make_coco_dataset(root: Path, num_images: int = 8, size: Tuple[int, int] = (160, 224), seed: int = 0) -> Path:
    """Write ``root/images/*.png`` and ``root/annotations.json`` (COCO instances format: boxes ``[x, y, w, h]``,
    polygon masks, categories): 1-3 coloured rectangles per noisy image. Returns the annotation file."""
    from PIL import Image, ImageDraw
    rng = random.Random(seed)
    height, width = size
    (root / 'images').mkdir(parents=True, exist_ok=True)
    categories = [{'id': i + 1, 'name': name} for i, name in enumerate(COLOURS)]
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        pixels = bytes(rng.randrange(90, 160) for _ in range(width * height * 3))
        image = Image.frombytes('RGB', (width, height), pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 3)):
            category = rng.choice(categories)
            w, h = rng.randint(width // 6, width // 2), rng.randint(height // 6, height // 2)
            x, y = rng.randint(0, width - w), rng.randint(0, height - h)
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=COLOURS[category['name']])
            annotations.append({
                'id': len(annotations) + 1, 'image_id': image_id, 'category_id': category['id'],
                'bbox': [x, y, w, h], 'area': w * h, 'iscrowd': 0,
                'segmentation': [[x, y, x + w, y, x + w, y + h, x, y + h]]})
        file_name = f'{image_id:04d}.png'
        image.save(root / 'images' / file_name)
        images.append({'id': image_id, 'file_name': file_name, 'height': height, 'width': width})
    annotation_file = root / 'annotations.json'
    annotation_file.write_text(json.dumps({'images': images, 'annotations': annotations, 'categories': categories}))
    return annotation_file


class CocoInstances(torch.utils.data.Dataset):
    """A COCO instances file as torchvision detection targets (``boxes`` xyxy, ``labels``, ``masks``).

    Polygons are rasterised with Pillow (no pycocotools needed); later objects cover earlier ones."""

    def __init__(self, annotation_file: Path, image_dir: Optional[Path] = None) -> None:
        coco = json.loads(Path(annotation_file).read_text())
        self.image_dir = Path(image_dir or Path(annotation_file).parent / 'images')
        self.images = coco['images']
        self.categories = {c['id']: c['name'] for c in coco['categories']}
        self.objects: Dict[int, List[dict]] = {image['id']: [] for image in self.images}
        for annotation in coco['annotations']:
            if not annotation.get('iscrowd'):
                self.objects[annotation['image_id']].append(annotation)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tuple[Tensor, Dict[str, Tensor]]:
        from PIL import Image, ImageDraw
        info = self.images[index]
        image = Image.open(self.image_dir / info['file_name']).convert('RGB')
        masks, boxes, labels = [], [], []
        for annotation in self.objects[info['id']]:
            mask = Image.new('L', image.size)
            for polygon in annotation['segmentation']:
                ImageDraw.Draw(mask).polygon(polygon, fill=1)
            x, y, w, h = annotation['bbox']
            boxes.append([x, y, x + w, y + h])
            labels.append(annotation['category_id'])
            masks.append(torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8).view(image.height, image.width))
        return _to_tensor(image), {
            'boxes': torch.tensor(boxes, dtype=torch.float32).view(-1, 4),
            'labels': torch.tensor(labels, dtype=torch.int64),
            'masks': torch.stack(masks) if masks else torch.zeros(0, image.height, image.width, dtype=torch.uint8),
        }


def _to_tensor(image) -> Tensor:
    """A PIL RGB image as a float CHW tensor in [0, 1] (torchvision detectors normalise themselves)."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1).float() / 255


def optimizer_param_groups(detector: nn.Module, lr: float, weight_decay: float = 0.05,
                           layer_decay: float = 0.9) -> List[Dict[str, Any]]:
    """Backbone groups with layer-wise decayed learning rates (timm's ``param_groups_layer_decay`` over
    InternImage's ``group_matcher``: the stem gets ``lr * layer_decay ** (num_layers)``, the last stage's blocks
    nearly ``lr``), then the neck and heads at ``lr``."""
    internimage = detector.backbone.body.model
    groups = param_groups_layer_decay(internimage, weight_decay, internimage.no_weight_decay(),
                                      layer_decay=layer_decay)
    for group in groups:
        group['lr'] = lr * group.pop('lr_scale')
    backbone = {id(p) for p in internimage.parameters()}
    rest = [p for p in detector.parameters() if id(p) not in backbone and p.requires_grad]
    return groups + [{'params': rest, 'lr': lr, 'weight_decay': weight_decay}]


def collate(batch):
    return tuple(zip(*batch))


def train(detector: nn.Module, dataset: torch.utils.data.Dataset, steps: int, lr: float = 1e-4,
          batch_size: int = 2, log_every: int = 10) -> List[float]:
    """``steps`` AdamW updates of the detector's summed losses; returns each step's total loss."""
    detector.train()
    optimizer = torch.optim.AdamW(optimizer_param_groups(detector, lr))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate)
    losses: List[float] = []
    while len(losses) < steps:
        for images, targets in loader:
            loss_dict = detector(list(images), list(targets))
            loss = sum(loss_dict.values())
            if not math.isfinite(loss.item()):
                raise RuntimeError(f'non-finite loss at step {len(losses)}: {loss_dict}')
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if log_every and len(losses) % log_every == 0:
                print(f'step {len(losses)}: loss {loss.item():.3f}')
            if len(losses) == steps:
                break
    return losses


@torch.no_grad()
def detect(detector: nn.Module, image_path: Path, score_threshold: float = 0.05,
           max_detections: int = 10) -> List[Tuple[int, float, List[float]]]:
    """``(label, score, [x0, y0, x1, y1])`` of the detector's best detections in an image, best first."""
    from PIL import Image
    detector.eval()
    (output,) = detector([_to_tensor(Image.open(image_path).convert('RGB'))])
    keep = output['scores'] >= score_threshold
    return [(int(label), float(score), [round(v, 1) for v in box.tolist()]) for label, score, box in zip(
        output['labels'][keep][:max_detections], output['scores'][keep][:max_detections],
        output['boxes'][keep][:max_detections])]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='internimage_t.coco_mask_rcnn_1x',
                        help='a detection tag (see `python -m timm_internimage list`)')
    parser.add_argument('--no-pretrained', action='store_true', help='random backbone (no download)')
    parser.add_argument('--model-args', default='{}', help='JSON keyword arguments of timm.create_model')
    parser.add_argument('--out', type=Path, default=Path('runs/detection'), help='where the dataset is written')
    parser.add_argument('--images', type=int, default=16, help='generated training images')
    parser.add_argument('--steps', type=int, default=30)
    parser.add_argument('--lr', type=float, default=1e-4)
    parser.add_argument('--min-size', type=int, default=320, help='short side the detector resizes to')
    parser.add_argument('--max-size', type=int, default=512, help='long side limit')
    parser.add_argument('--image', type=Path, default=None, help='photo to run on (default: the bundled cat)')
    args = parser.parse_args(argv)

    annotation_file = make_coco_dataset(args.out / 'coco', args.images)
    dataset = CocoInstances(annotation_file)
    detector = build_detector(args.model, pretrained=not args.no_pretrained, min_size=args.min_size,
                              max_size=args.max_size, **json.loads(args.model_args))
    losses = train(detector, dataset, args.steps, args.lr)
    print(f'trained {len(losses)} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}')
    from timm_internimage.tools.images import sample_image_path
    image = args.image or sample_image_path()
    names = {0: 'background', **dataset.categories}
    for label, score, box in detect(detector, image):
        print(f'{image.name}: {names.get(label, label):<8} {score:.3f} {box}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
