"""torch.hub entry points for InternImage (timm-internimage).

    import torch
    model = torch.hub.load('<owner>/timm-internimage', 'internimage_t', pretrained=True)
    print(torch.hub.help('<owner>/timm-internimage', 'internimage_t'))

Weights come from the Hugging Face Hub as safetensors (see weights_manifest.json) and are cached by
huggingface_hub (HF_HOME, HF_HUB_OFFLINE, HF_ENDPOINT and tokens apply).
"""
dependencies = ['torch', 'timm', 'huggingface_hub', 'safetensors']

_DOC = """InternImage-{size} ({params} parameters), built with timm.create_model.

    Args:
        pretrained (bool): load pretrained weights (default False).
        tag (str): pretrained tag, one of {tags} (default {default!r}).
        features_only (bool): return a feature extractor (the four stage outputs, strides 4-32).
        **kwargs: passed through to timm.create_model (num_classes, in_chans, drop_path_rate, out_indices,
            pretrained_cfg_overlay=dict(file=...) for local weights, ...).

    Returns:
        torch.nn.Module: an InternImage model (eval mode is up to the caller).
    """


def _create(model_name, pretrained, tag, features_only, kwargs):
    import timm
    import timm_internimage  # noqa: F401  (registers the models with timm)
    from timm_internimage._manifest import load_manifest
    tags = [t.split('.', 1)[1] for t in load_manifest()['models'] if t.split('.')[0] == model_name]
    if tag is not None and tag not in tags:
        raise ValueError(f'{model_name} has no pretrained tag {tag!r}; choose one of {tags}')
    name = f'{model_name}.{tag}' if tag else model_name
    if features_only:
        kwargs['features_only'] = True
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _entrypoint(model_name, size, params, tags):
    def entry(pretrained=False, tag=None, features_only=False, **kwargs):
        return _create(model_name, pretrained, tag, features_only, kwargs)
    entry.__name__ = entry.__qualname__ = model_name
    entry.__doc__ = _DOC.format(size=size, params=params, tags=tags, default=tags[0])
    return entry


internimage_t = _entrypoint('internimage_t', 'T', '30M', ['in1k'])
internimage_s = _entrypoint('internimage_s', 'S', '50M', ['in1k'])
internimage_b = _entrypoint('internimage_b', 'B', '97M', ['in1k'])
internimage_l = _entrypoint('internimage_l', 'L', '223M', ['in22k_ft_in1k_384', 'in22k_384'])
internimage_xl = _entrypoint('internimage_xl', 'XL', '335M', ['in22k_ft_in1k_384', 'in22k_384'])
internimage_h = _entrypoint('internimage_h', 'H', '1.08B', ['joint_in22k_ft_in1k_640', 'joint_in22k_384'])
internimage_g = _entrypoint('internimage_g', 'G', '3B', ['joint_in22k_ft_in1k_512', 'joint_in22k_384'])
