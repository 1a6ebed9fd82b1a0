"""``python -m timm_internimage`` (also the ``timm-internimage`` console script).

Commands:
    predict [IMAGE ...]       classify images (default: a photo shipped with the package)
    validate DATA             top-1 / top-5, loss and throughput on a labelled image folder, vs the published top-1
    convert SRC OUT_DIR       official .pth / HF-format folder / Hub repo id -> timm folder (config.json + model.safetensors)
    list                      the pretrained tags and where their weights live
    manifest-refresh          (maintainers, online) pin revisions, sizes and sha256 in weights_manifest.json
    export OUT                ONNX / OpenVINO / torch.export / AOTInductor artifact, checked against eager PyTorch
"""
import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from .tools.convert import convert
from .tools.images import SAMPLE_IMAGE_CREDIT, check_images, sample_image_path
from .tools.loading import UsageError, load_pretrained_model
from .tools.predict import DEFAULT_MODEL, predict
from .tools.tags import list_tags, refresh_manifest

__all__ = ['main', 'build_parser']


def _out(text: str = '') -> None:
    sys.stdout.write(text + '\n')


def _err(text: str) -> None:
    sys.stderr.write(text + '\n')
    sys.stderr.flush()


def _json_arg(text: Optional[str], what: str) -> Dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UsageError(f'{what} is not valid JSON: {e}') from e
    if not isinstance(value, dict):
        raise UsageError(f'{what} must be a JSON object, got {text!r}')
    return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}



def _positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    return value


def _cmd_predict(args: argparse.Namespace) -> int:
    images = list(args.images)
    if not images:
        images = [str(sample_image_path())]
        if not args.json:
            _err(f'No IMAGE given; classifying the sample photo {SAMPLE_IMAGE_CREDIT}.')
    model_kwargs = _json_arg(args.model_args, '--model-args')
    check_images(images)  # report unreadable images before anything is downloaded
    if not args.json:
        _err(_loading_message(args.model, args.checkpoint))
    results = predict(images, args.model, args.top_k, device=args.device, checkpoint=args.checkpoint,
                      model_kwargs=model_kwargs, batch_size=args.batch_size)
    failed = [result for result in results if 'error' in result]
    for result in failed:
        _err(f'error: {result["error"]}')
    if failed:
        _err(f'{len(failed)} of {len(results)} image(s) could not be classified')
    status = 1 if failed else 0
    if args.json:
        _out(json.dumps({'model': args.model, 'results': results}, indent=2, allow_nan=False))
        return status
    for result in results:
        if 'error' in result:
            continue
        _out(result['image'])
        width = max(len(p['label']) for p in result['predictions'])
        for p in result['predictions']:
            _out(f'  {p["rank"]:>2}. {p["label"]:<{width}}  {100 * p["probability"]:6.2f}%  (class {p["index"]})')
    return status


def _loading_message(model_name: str, checkpoint: Optional[str]) -> str:
    if checkpoint:
        return f'Loading {model_name} with the weights in {checkpoint} ...'
    return f'Loading {model_name} (weights are downloaded once, then read from the Hugging Face cache) ...'


# ----------------------------------------------------------------------------------------------------------------
# validate (the evaluation itself is validate.py)


def _cmd_validate(args: argparse.Namespace) -> int:
    from .tools.validate import FULL_VAL_IMAGES, GAP_POINTS, validate
    if not args.json:
        _err(_loading_message(args.model, args.checkpoint))
    summary = validate(args.data, args.model, labels=args.labels, batch_size=args.batch_size, workers=args.workers,
                       device=args.device, amp=args.amp, channels_last=args.channels_last, limit=args.limit,
                       checkpoint=args.checkpoint, model_kwargs=_json_arg(args.model_args, '--model-args'),
                       all_classes=args.all_classes, real=args.real_labels or args.real, progress=not args.json)
    if args.json:
        _out(json.dumps(summary, indent=2, allow_nan=False))
        return 1 if summary['gap_flagged'] else 0
    _out(f'{summary["model"]} on {summary["data"]}: {summary["images"]} images ({summary["layout"]}; '
         f'labels: {summary["labels"]})')
    _out(f'  top-1 {summary["top1"]:7.3f}%   top-5 {summary["top5"]:7.3f}%   loss {summary["loss"]:.4f}   '
         f'{summary["img_per_s"]:.1f} img/s ({summary["device"]}, {summary["amp"] or "float32"}, '
         f'batch {summary["batch_size"]})')
    if summary.get('real_top1') is not None:
        _out(f'  ImageNet-ReaL top-1 {summary["real_top1"]:7.3f}%   top-5 {summary["real_top5"]:7.3f}%   '
             f'({summary["real_images"]} images with ReaL labels)')
    published = summary['published_top1']
    if published is None:
        _out('  published top-1: none for this model and labels (only the ImageNet-1k tags have one)')
        return 0
    _out(f'  published top-1 {published:.1f}%, measured {summary["top1"]:.2f}% ({summary["top1_gap"]:+.2f} points)')
    if summary['gap_flagged']:
        _out(f'  WARNING: more than {GAP_POINTS} points from the published top-1 on the full {FULL_VAL_IMAGES:,}-image '
             f'val set: check the weights (conversion) and the preprocessing')
        return 1
    if not summary['full_val']:
        _out(f'  (not the full {FULL_VAL_IMAGES:,}-image ImageNet-1k val set: the comparison is indicative only)')
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    out = convert(args.src, args.out_dir, args.model, _json_arg(args.model_args, '--model-args'), args.revision,
                  args.force)
    _err(f'Wrote {out / "config.json"} and {out / "model.safetensors"}.')
    _out(str(out))
    _err(f'Load it with timm.create_model("local-dir:{out}", pretrained=True) after `import timm_internimage`, '
         f'or upload the folder and use "hf-hub:<your repo>".')
    return 0


# ----------------------------------------------------------------------------------------------------------------
# list


def _cmd_list(args: argparse.Namespace) -> int:
    rows = list_tags()
    if args.json:
        _out(json.dumps(rows, indent=2))
        return 0
    _out(f'{"model.tag":<56} {"Hub repo":<36} {"classes":>7} {"input":>5}  {"task":<14} size      '
         f'{"revision":<22} published')
    for name, row in rows.items():
        scores = ', '.join(f'{metric} {value}' for metric, value in row['scores'].items()) or '-'
        revision = row['revision'][:10] + (' (unpinned)' if row['revision'] == 'main' else '')
        _out(f'{name:<56} {row["hf_hub_id"]:<36} {row["num_classes"]:>7} {row["input_size"][1]:>5}  '
             f'{row["task"]:<14} {row["size"]:<9} {revision:<22} {scores}')
    return 0


def _cmd_manifest_refresh(args: argparse.Namespace) -> int:
    from ._manifest import dump_manifest, manifest_path
    path = Path(args.manifest) if args.manifest else manifest_path()
    manifest = json.loads(path.read_text(encoding='utf-8'))
    refresh_manifest(manifest, args.tags or None, progress=_err)
    if args.dry_run:
        _out(dump_manifest(manifest).rstrip('\n'))
    else:
        path.write_text(dump_manifest(manifest), encoding='utf-8')
        _err(f'Updated {path}.')
    return 0


# ----------------------------------------------------------------------------------------------------------------
# export (the export itself is export.py)


def _cmd_export(args: argparse.Namespace) -> int:
    import torch
    from .tools.export import ExportError, check_format, export_model
    model_kwargs = _json_arg(args.model_args, '--model-args')
    if args.out_indices and not args.features_only:
        raise UsageError('--out-indices selects the stages of --features-only; add --features-only')
    if args.features_only:
        model_kwargs['features_only'] = True
        if args.out_indices:
            model_kwargs['out_indices'] = tuple(args.out_indices)
    try:
        check_format(args.format)  # before any download
        _err(_loading_message(args.model, args.checkpoint))
        model = load_pretrained_model(args.model, args.checkpoint, model_kwargs, torch.device('cpu'))
        result = export_model(model, args.out, args.format, dynamic=args.dynamic, batch=args.batch,
                              img_size=tuple(args.img_size) if args.img_size else None, dtype=args.dtype,
                              progress=_err)
    except ExportError as e:
        raise UsageError(str(e)) from None
    _err(f'Wrote {", ".join(str(path) for path in result.files)} in {result.export_seconds:.1f} s.')
    _out(f'{result.format} {result.path}: max abs difference from eager PyTorch {result.max_abs_diff:.3g} '
         f'(tolerance {result.tolerance:.3g}) on input {result.checked_shape}')
    return 0


# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m timm_internimage',
        description='InternImage models for timm: classify images, convert checkpoints, inspect pretrained tags.')
    parser.add_argument('-v', '--verbose', action='store_true', help='log loading details')
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

    p = sub.add_parser('predict', help='classify images with a pretrained model',
                       description='Print the top ImageNet classes of each image. With no IMAGE, classify a sample '
                                   'photo shipped with the package (' + SAMPLE_IMAGE_CREDIT + ').')
    p.add_argument('images', nargs='*', metavar='IMAGE', help='image files (any format Pillow reads)')
    p.add_argument('--model', '-m', default=DEFAULT_MODEL, help=f'model name or model.tag (default {DEFAULT_MODEL})')
    p.add_argument('--top-k', '-k', type=_positive_int, default=5,
                   help='number of classes to print (default 5; at most the class count)')
    p.add_argument('--json', action='store_true', help='print JSON instead of text')
    p.add_argument('--device', default='auto', help='torch device (default auto: CUDA if available, then MPS, '
                                                    'else CPU)')
    p.add_argument('--batch-size', type=_positive_int, default=8, help='images per forward pass (default 8)')
    p.add_argument('--checkpoint', help='local weights (.safetensors, official .pth, or a converted folder) '
                                        'instead of the Hub')
    p.add_argument('--model-args', help='extra timm.create_model keyword arguments as a JSON object')
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser('validate', help='top-1 / top-5, loss and throughput on a labelled image folder',
                       description='Evaluate a pretrained model on DATA: class folders (ImageNet wnids such as '
                                   'n01440764, ImageNet-1k indices 0-999 as in ImageNet-V2, or any names for a '
                                   'fine-tuned head), or a flat folder with --labels. Prints top-1 / top-5, loss '
                                   'and throughput, and the published top-1 of the tag; on the full 50,000-image '
                                   'val set a gap above 0.3 points is flagged (exit status 1).')
    p.add_argument('data', metavar='DATA', help='image folder')
    p.add_argument('--model', '-m', default=DEFAULT_MODEL, help=f'model name or model.tag (default {DEFAULT_MODEL})')
    p.add_argument('--labels', help='labels of a flat folder: CSV filename,label (wnid or ImageNet-1k index), the '
                                    "Caffe val.txt or Kaggle's LOC_val_solution.csv")
    p.add_argument('--real', action='store_true',
                   help='also score ImageNet-ReaL labels (timm\'s bundled real.json); ImageNet val images only')
    p.add_argument('--real-labels', metavar='REAL_JSON', help='--real with this real.json instead of timm\'s')
    p.add_argument('--all-classes', action='store_true',
                   help='21841-class tags: score all outputs, not only the 1000 ImageNet-1k ones')
    p.add_argument('--batch-size', '-b', type=_positive_int, default=64, help='images per batch (default 64)')
    p.add_argument('--workers', '-j', type=int, default=min(8, os.cpu_count() or 1),
                   help='DataLoader worker processes (default: CPU count, at most 8; 0 loads in this process)')
    p.add_argument('--device', default='auto', help='torch device (default auto: CUDA if available, then MPS, '
                                                    'else CPU)')
    p.add_argument('--amp', choices=('bf16', 'fp16'), help='autocast to this dtype (default: float32)')
    p.add_argument('--channels-last', action='store_true', help='channels_last memory format')
    p.add_argument('--limit', type=_positive_int, help='evaluate only N images, spread evenly over the data')
    p.add_argument('--json', action='store_true', help='print the summary as JSON (no progress bar)')
    p.add_argument('--checkpoint', help='local weights (.safetensors, official .pth, or a converted folder) '
                                        'instead of the Hub')
    p.add_argument('--model-args', help='extra timm.create_model keyword arguments as a JSON object')
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser('convert', help='write a timm folder (config.json + model.safetensors) from a checkpoint',
                       description='SRC: an official .pth, a .safetensors file or HF-format folder, or a Hub repo '
                                   'id (e.g. OpenGVLab/internimage_t_1k_224, optionally @revision). The output '
                                   'loads with timm.create_model("local-dir:OUT_DIR") or, uploaded, "hf-hub:<repo>".')
    p.add_argument('src')
    p.add_argument('out_dir')
    p.add_argument('--model', help='model name or model.tag (default: inferred from the weights or the manifest)')
    p.add_argument('--model-args', help='model keyword arguments as a JSON object (non-standard configs)')
    p.add_argument('--revision', help='Hub revision for a repo id')
    p.add_argument('--force', action='store_true', help='overwrite an existing config.json / model.safetensors')
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser('list', help='list the pretrained tags (from weights_manifest.json)')
    p.add_argument('--json', action='store_true')
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser('manifest-refresh', help='(maintainers, online) pin revisions, sizes and sha256 from the Hub',
                       description='Query the Hub (HF_ENDPOINT) for every tag: pin its revision to the current '
                                   'commit, record the weight layout and each file\'s size and sha256, and clear '
                                   'the corresponding "unverified" fields in weights_manifest.json.')
    p.add_argument('--tags', nargs='*', help='only these tags (default: all)')
    p.add_argument('--manifest', help='manifest file to update (default: the package\'s weights_manifest.json)')
    p.add_argument('--dry-run', action='store_true', help='print the updated manifest instead of writing it')
    p.set_defaults(func=_cmd_manifest_refresh)

    p = sub.add_parser('export', help='write an ONNX / OpenVINO / torch.export / AOTInductor artifact',
                       description='Export a model, run the artifact once in its runtime (ONNX Runtime for onnx, '
                                   'OpenVINO for openvino, torch for torch-export and aoti) on an input of another '
                                   'batch and size (with --dynamic), and print its max abs difference from eager '
                                   'PyTorch; above 1e-4 (float32) it is an error and no file is left behind. '
                                   'onnx needs `pip install onnx onnxruntime`, openvino `pip install onnx '
                                   'openvino`.')
    p.add_argument('out', metavar='OUT', help='file to write (.onnx; .xml for openvino, with its .bin; .pt2)')
    p.add_argument('--model', '-m', default=DEFAULT_MODEL, help=f'model name or model.tag (default {DEFAULT_MODEL})')
    p.add_argument('--checkpoint', help='local weights (.safetensors, official .pth, or a converted folder) '
                                        'instead of the Hub')
    p.add_argument('--model-args', help='extra timm.create_model keyword arguments as a JSON object')
    p.add_argument('--features-only', action='store_true',
                   help='export the backbone: one NCHW output per stage (for detection and segmentation)')
    p.add_argument('--out-indices', type=int, nargs='+', metavar='I', help='with --features-only: these stages')
    p.add_argument('--format', default='onnx', help='onnx (default), openvino, torch-export or aoti')
    p.add_argument('--dynamic', action='store_true',
                   help='dynamic batch, height and width (else fixed to --batch and --img-size)')
    p.add_argument('--batch', type=_positive_int, default=1, help='batch size of the traced input (default 1)')
    p.add_argument('--img-size', type=_positive_int, nargs=2, metavar=('H', 'W'),
                   help="height and width of the traced input (default: the tag's input size)")
    p.add_argument('--dtype', choices=('float32', 'float16'), default='float32', help='weights and input dtype')
    p.set_defaults(func=_cmd_export)
    return parser


def _setup_logging(verbose: bool) -> None:
    """Log records on stderr; huggingface_hub's are left to its own handler (else they would print twice)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter('%(levelname)s %(name)s: %(message)s'))
    handler.addFilter(lambda record: not record.name.startswith('huggingface_hub'))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    from .pretrained import PretrainedWeightsError
    try:
        return args.func(args)
    except UsageError as e:
        _err(f'error: {e}')
        return 2
    except PretrainedWeightsError as e:
        _err(f'error: {e}')
        return 1
    except OSError as e:  # includes huggingface_hub's HTTP errors (repo not found, private repo, ...)
        _err(f'error: {e}')
        return 1


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
