"""``python -m timm_internimage`` (also the ``timm-internimage`` console script).

Commands:
    predict [IMAGE ...]       classify images (default: a photo shipped with the package)
    convert SRC OUT_DIR       official .pth / HF-format folder / Hub repo id -> timm folder (config.json + model.safetensors)
    list                      the pretrained tags and where their weights live
    manifest-refresh          (maintainers, online) pin revisions, sizes and sha256 in weights_manifest.json
"""
import argparse
import datetime
import json
import logging
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

__all__ = ['main', 'build_parser', 'SAMPLE_IMAGE_NAME']

SAMPLE_IMAGE_NAME = 'chelsea.jpg'
SAMPLE_IMAGE_CREDIT = ("'Chelsea the cat', scikit-image sample data (skimage.data.chelsea), CC0 by the photographer "
                       "Stefan van der Walt")
DEFAULT_MODEL = 'internimage_t.in1k'


class CliError(Exception):
    """An error reported to the user as ``error: ...`` with exit status 2, without a traceback."""


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
        raise CliError(f'{what} is not valid JSON: {e}') from e
    if not isinstance(value, dict):
        raise CliError(f'{what} must be a JSON object, got {text!r}')
    return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}


# ----------------------------------------------------------------------------------------------------------------
# predict


def sample_image_path() -> Path:
    return Path(str(resources.files('timm_internimage').joinpath('data', SAMPLE_IMAGE_NAME)))


def _read_images(paths: Sequence[str]):
    from PIL import Image, UnidentifiedImageError
    images, problems = [], []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append((path, image.convert('RGB')))
        except FileNotFoundError:
            problems.append(f'{path}: no such file')
        except IsADirectoryError:
            problems.append(f'{path}: is a directory, not an image')
        except UnidentifiedImageError:
            problems.append(f'{path}: not an image file Pillow can read (unknown or corrupt format)')
        except (OSError, ValueError) as e:
            problems.append(f'{path}: cannot be read as an image ({e})')
    if problems:
        raise CliError('cannot read image(s):\n  ' + '\n  '.join(problems))
    return images


def _label_fn(model):
    from timm.data import ImageNetInfo, infer_imagenet_subset
    subset = infer_imagenet_subset(model)
    if subset is None:
        return lambda index: f'class {index}'
    info = ImageNetInfo(subset)
    return lambda index: info.index_to_description(index)


def predict(
        images: Sequence[str],
        model_name: str = DEFAULT_MODEL,
        top_k: int = 5,
        device: str = 'cpu',
        checkpoint: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        batch_size: int = 8,
) -> List[Dict[str, Any]]:
    """Classify image files; returns ``[{image, predictions: [{rank, index, label, probability}]}]``."""
    import torch
    import timm
    from timm.data import create_transform, resolve_data_config
    from . import internimage  # noqa: F401  (registers the models)

    loaded = _read_images(images)  # fail on unreadable images before downloading weights
    kwargs = dict(model_kwargs or {})
    if checkpoint:
        kwargs['pretrained_cfg_overlay'] = dict(file=checkpoint)
    model = timm.create_model(model_name, pretrained=True, **kwargs).eval().to(device)
    data_config = resolve_data_config(model=model)
    transform = create_transform(**data_config, is_training=False)
    label = _label_fn(model)
    top_k = max(1, min(top_k, model.num_classes))
    results = []
    with torch.inference_mode():
        for start in range(0, len(loaded), batch_size):
            chunk = loaded[start:start + batch_size]
            batch = torch.stack([transform(image) for _, image in chunk]).to(device)
            probs = model(batch).float().softmax(dim=-1)
            values, indices = probs.topk(top_k, dim=-1)
            for (path, _), vals, idxs in zip(chunk, values.tolist(), indices.tolist()):
                results.append({
                    'image': str(path),
                    'predictions': [
                        {'rank': r + 1, 'index': i, 'label': label(i), 'probability': v}
                        for r, (v, i) in enumerate(zip(vals, idxs))
                    ],
                })
    return results


def _cmd_predict(args: argparse.Namespace) -> int:
    images = list(args.images)
    if not images:
        images = [str(sample_image_path())]
        if not args.json:
            _err(f'No IMAGE given; classifying the sample photo {SAMPLE_IMAGE_CREDIT}.')
    _read_images(images)  # report unreadable images before anything is downloaded
    if not args.json:
        _err(f'Loading {args.model} (weights are downloaded once, then read from the Hugging Face cache) ...')
    results = predict(
        images, args.model, args.top_k, device=args.device, checkpoint=args.checkpoint,
        model_kwargs=_json_arg(args.model_args, '--model-args'), batch_size=args.batch_size)
    if args.json:
        _out(json.dumps({'model': args.model, 'results': results}, indent=2))
        return 0
    for result in results:
        _out(result['image'])
        width = max(len(p['label']) for p in result['predictions'])
        for p in result['predictions']:
            _out(f'  {p["rank"]:>2}. {p["label"]:<{width}}  {100 * p["probability"]:6.2f}%  (class {p["index"]})')
    return 0


# ----------------------------------------------------------------------------------------------------------------
# the pretrained tags


def _repo_tags() -> Dict[str, str]:
    """Hub repo -> the ``model.tag`` whose weights it holds."""
    from .internimage import pretrained_cfgs
    return {cfg.hf_hub_id.partition('@')[0]: name for name, cfg in pretrained_cfgs().items()}


# ----------------------------------------------------------------------------------------------------------------
# convert


def _infer_model(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Variant and class count of a checkpoint in any of the three key formats, from its stem and classifier."""
    import timm
    from .internimage import _VARIANT_ARGS, checkpoint_filter_fn
    keys = checkpoint_filter_fn(state_dict, timm.create_model('internimage_t', device='meta'))
    if 'stem.conv1.weight' not in keys:
        raise CliError('cannot tell the architecture: the checkpoint has no stem convolution '
                       '(patch_embed.conv1.weight); pass --model')
    channels = 2 * keys['stem.conv1.weight'].shape[0]
    models = {args['channels']: model for model, args in _VARIANT_ARGS.items()}
    if channels not in models:
        raise CliError(f'no released InternImage has {channels} channels; pass --model and --model-args')
    inferred = {'model': models[channels]}
    if 'head.fc.weight' in keys:
        inferred['num_classes'] = keys['head.fc.weight'].shape[0]
    return inferred


def convert(
        src: str,
        out_dir: str,
        model_name: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        revision: Optional[str] = None,
) -> Path:
    """Write ``out_dir/config.json`` + ``out_dir/model.safetensors`` (this package's key names) from ``src``."""
    import torch
    import timm
    from safetensors.torch import save_file
    from timm.models import get_arch_pretrained_cfgs
    from timm.models._hub import save_config_for_hf
    from .internimage import checkpoint_filter_fn
    from .pretrained import PretrainedWeightsError, fetch_hub_weights, load_checkpoint

    kwargs = dict(model_kwargs or {})
    src_path = Path(src).expanduser()
    if src_path.exists():
        state_dict = load_checkpoint(src_path)
    elif src.count('/') == 1 and not src.endswith(('.pth', '.safetensors', '.json')):
        repo_id, _, at_revision = src.partition('@')
        files = fetch_hub_weights(repo_id, revision or at_revision or None)
        state_dict = load_checkpoint(next(iter(files.values())))
        model_name = model_name or _repo_tags().get(repo_id)
    else:
        raise CliError(f'{src}: no such file or folder (and not a Hub repo id like OpenGVLab/internimage_t_1k_224)')

    if model_name is None:
        inferred = _infer_model(state_dict)
        model_name = inferred.pop('model')
        for key, value in inferred.items():
            kwargs.setdefault(key, value)
    if '.' not in model_name and 'num_classes' in kwargs:
        # a released tag with the same class count carries the right preprocessing metadata
        model_name = next((name for name, cfg in get_arch_pretrained_cfgs(model_name).items()
                           if cfg.num_classes == kwargs['num_classes']), model_name)
    meta_model = timm.create_model(model_name, pretrained=False, device='meta', **kwargs)
    converted = checkpoint_filter_fn(state_dict, meta_model)
    try:
        meta_model.load_state_dict(converted, assign=True)  # every key and shape, before anything is written
    except RuntimeError as e:
        raise PretrainedWeightsError(f'checkpoint does not fit {model_name} {kwargs or ""}: {e}') from e
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in converted.items()}, str(out / 'model.safetensors'),
              metadata={'format': 'pt'})
    save_config_for_hf(meta_model, str(out / 'config.json'), model_args={
        k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items() if k != 'num_classes'})
    return out


def _cmd_convert(args: argparse.Namespace) -> int:
    out = convert(args.src, args.out_dir, args.model, _json_arg(args.model_args, '--model-args'), args.revision)
    _err(f'Wrote {out / "config.json"} and {out / "model.safetensors"}.')
    _out(str(out))
    _err(f'Load it with timm.create_model("local-dir:{out}", pretrained=True) after `import timm_internimage`, '
         f'or upload the folder and use "hf-hub:<your repo>".')
    return 0


# ----------------------------------------------------------------------------------------------------------------
# list


def _cmd_list(args: argparse.Namespace) -> int:
    from ._manifest import repo_entry
    from .internimage import pretrained_cfgs
    rows = {}
    for name, cfg in pretrained_cfgs().items():
        repo_id, _, revision = cfg.hf_hub_id.partition('@')
        entry = repo_entry(repo_id)
        rows[name] = dict(hf_hub_id=repo_id, revision=revision or 'main', num_classes=cfg.num_classes,
                          input_size=list(cfg.input_size), top1=entry['top1'], size=entry['approx_size'])
    if args.json:
        _out(json.dumps(rows, indent=2))
        return 0
    _out(f'{"model.tag":<40} {"Hub repo":<40} {"classes":>7} {"input":>5} {"top-1":>6}  size     revision')
    for name, row in rows.items():
        top1 = '-' if row['top1'] is None else f'{row["top1"]:.1f}'
        revision = row['revision'][:10] + (' (unpinned)' if row['revision'] == 'main' else '')
        _out(f'{name:<40} {row["hf_hub_id"]:<40} {row["num_classes"]:>7} {row["input_size"][1]:>5} {top1:>6}  '
             f'{row["size"]:<8} {revision}')
    return 0


# ----------------------------------------------------------------------------------------------------------------
# manifest-refresh


def refresh_manifest(manifest: Dict[str, Any], tags: Optional[Sequence[str]] = None,
                     endpoint: Optional[str] = None) -> Dict[str, Any]:
    """Pin the repos of every (or the given) tag to their current commit and record weight file sizes and sha256.

    Sizes and sha256 of LFS files come from the Hub's file metadata; a non-LFS file (the shard index) is
    downloaded at the pinned commit and hashed. Returns the updated manifest (also modified in place).
    """
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.utils.sha import sha_fileobj
    from ._manifest import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
    from .pretrained import shard_names
    repo_tags = {name: repo for repo, name in _repo_tags().items()}
    unknown = [tag for tag in (tags or []) if tag not in repo_tags]
    if unknown:
        raise CliError(f'unknown tag(s) {unknown}; see `python -m timm_internimage list`')
    api = HfApi(endpoint=endpoint)
    for repo_id in ([repo_tags[tag] for tag in tags] if tags else list(manifest['repos'])):
        entry = manifest['repos'][repo_id]
        info = api.model_info(repo_id, files_metadata=True)
        siblings = {s.rfilename: s for s in info.siblings or []}

        def describe(name: str) -> Dict[str, Any]:
            sibling = siblings[name]
            if sibling.lfs is not None:
                return {'size': sibling.lfs.size, 'sha256': sibling.lfs.sha256}
            path = Path(hf_hub_download(repo_id, name, revision=info.sha, endpoint=endpoint))
            with open(path, 'rb') as f:
                return {'size': path.stat().st_size, 'sha256': sha_fileobj(f).hex()}

        entry.pop('file', None)
        entry.pop('index_file', None)
        if SAFE_WEIGHTS_NAME in siblings:
            entry['file'] = SAFE_WEIGHTS_NAME
            files = {SAFE_WEIGHTS_NAME: describe(SAFE_WEIGHTS_NAME)}
        elif SAFE_WEIGHTS_INDEX_NAME in siblings:
            entry['index_file'] = SAFE_WEIGHTS_INDEX_NAME
            files = {SAFE_WEIGHTS_INDEX_NAME: describe(SAFE_WEIGHTS_INDEX_NAME)}
            index_path = hf_hub_download(repo_id, SAFE_WEIGHTS_INDEX_NAME, revision=info.sha, endpoint=endpoint)
            for shard in shard_names(index_path):
                if shard not in siblings:
                    raise CliError(f'{repo_id}@{info.sha}: the index lists {shard}, which the repo lacks')
                files[shard] = describe(shard)
        else:
            raise CliError(f'{repo_id}@{info.sha} has neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}')
        entry['revision'] = info.sha
        entry['files'] = files
        entry['unverified'] = [f for f in entry['unverified'] if f not in ('revision', 'files', 'layout')]
        _err(f'{repo_id}@{info.sha[:12]}: {len(files)} file(s), '
             f'{sum(f["size"] for f in files.values()) / 2 ** 20:.1f} MiB')
    manifest['refreshed'] = {
        'at': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'),
        'endpoint': api.endpoint,
        'tags': 'all' if not tags else list(tags),
    }
    return manifest


def _cmd_manifest_refresh(args: argparse.Namespace) -> int:
    from ._manifest import dump_manifest, manifest_path
    path = Path(args.manifest) if args.manifest else manifest_path()
    manifest = json.loads(path.read_text(encoding='utf-8'))
    refresh_manifest(manifest, args.tags or None)
    if args.dry_run:
        _out(dump_manifest(manifest).rstrip('\n'))
    else:
        path.write_text(dump_manifest(manifest), encoding='utf-8')
        _err(f'Updated {path}.')
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
    p.add_argument('--top-k', '-k', type=int, default=5, help='number of classes to print (default 5)')
    p.add_argument('--json', action='store_true', help='print JSON instead of text')
    p.add_argument('--device', default='cpu', help='torch device (default cpu)')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--checkpoint', help='local weights (.safetensors, official .pth, or a converted folder) '
                                        'instead of the Hub')
    p.add_argument('--model-args', help='extra timm.create_model keyword arguments as a JSON object')
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser('convert', help='write a timm folder (config.json + model.safetensors) from a checkpoint',
                       description='SRC: an official .pth, a .safetensors file or HF-format folder, or a Hub repo '
                                   'id (e.g. OpenGVLab/internimage_t_1k_224, optionally @revision). The output '
                                   'loads with timm.create_model("local-dir:OUT_DIR") or, uploaded, "hf-hub:<repo>".')
    p.add_argument('src')
    p.add_argument('out_dir')
    p.add_argument('--model', help='model name or model.tag (default: inferred from the weights or the manifest)')
    p.add_argument('--model-args', help='model keyword arguments as a JSON object (non-standard configs)')
    p.add_argument('--revision', help='Hub revision for a repo id')
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
    except CliError as e:
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
