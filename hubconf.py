"""torch.hub entry points for InternImage and FlashInternImage (timm-internimage), one per registered model.

    import torch
    model = torch.hub.load('path/to/timm-internimage', 'internimage_t', source='local', pretrained=True)  # a clone
    model = torch.hub.load('OWNER/timm-internimage', 'internimage_t', pretrained=True)  # OWNER: its GitHub account
    print(torch.hub.help('OWNER/timm-internimage', 'internimage_t'))

Weights come from the Hugging Face Hub as safetensors (see weights_manifest.json; FlashInternImage: the official
.pth of OpenGVLab/DCNv4, read with weights_only) and are cached by huggingface_hub (HF_HOME, HF_HUB_OFFLINE,
HF_ENDPOINT and tokens apply).
"""
import timm

import timm_internimage  # noqa: F401  (registers the models with timm)

dependencies = ['torch', 'timm', 'huggingface_hub', 'safetensors']

_DOC = """{family}-{size}, built with timm.create_model.

    Args:
        pretrained (bool): load pretrained weights (default False).
        tag (str): pretrained tag, one of {tags} (default {default!r}).
        features_only (bool): return a feature extractor (the four stage outputs, strides 4-32).
        **kwargs: passed through to timm.create_model (num_classes, in_chans, drop_path_rate, out_indices,
            pretrained_cfg_overlay=dict(file=...) for local weights, ...).

    Returns:
        torch.nn.Module: an {family} model (eval mode is up to the caller).
    """


def _entrypoint(model_name):
    tags = [name.split('.', 1)[1] for name in timm.models.get_arch_pretrained_cfgs(model_name)]

    def entry(pretrained=False, tag=None, features_only=False, **kwargs):
        if tag is not None and tag not in tags:
            raise ValueError(f'{model_name} has no pretrained tag {tag!r}; choose one of {tags}')
        name = f'{model_name}.{tag}' if tag else model_name
        return timm.create_model(name, pretrained=pretrained, features_only=features_only, **kwargs)

    entry.__name__ = entry.__qualname__ = model_name
    family = 'FlashInternImage' if model_name.startswith('flash_') else 'InternImage'
    entry.__doc__ = _DOC.format(
        family=family, size=model_name.rpartition('_')[2].upper(), tags=tags, default=tags[0])
    return entry


for _model_name in timm.list_models(module=['internimage', 'flash_internimage']):
    globals()[_model_name] = _entrypoint(_model_name)
