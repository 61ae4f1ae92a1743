"""torch.hub entry points: ``torch.hub.load("<repo dir>", "t2t_vit_14", source="local")``.

One entry point per registered model, generated from :func:`t2t_vit.list_models`.
``pretrained=True`` downloads the authors' released weights once (the model's default tag, or
``tag="in1k_384"``...); ``checkpoint_path=`` loads a local file instead and builds the model that
file describes (its stored ``model_kwargs``, image size and class count), so nothing is downloaded.
"""
import sys as _sys
from pathlib import Path as _Path

dependencies = ["torch", "timm"]

_SRC = str(_Path(__file__).resolve().parent / "src")
if _SRC not in _sys.path:
    _sys.path.insert(0, _SRC)

import t2t_vit as _t2t_vit  # noqa: E402


def _entrypoint(name):
    def entrypoint(pretrained=False, checkpoint_path=None, tag=None, **kwargs):
        if checkpoint_path:
            return _t2t_vit.model_from_checkpoint(checkpoint_path, name, **kwargs)
        return _t2t_vit.create_model(f"{name}.{tag}" if tag else name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = _t2t_vit.VARIANTS[name].note or f"{name} (T2T-ViT); kwargs go to t2t_vit.create_model."
    return entrypoint


for _name in _t2t_vit.list_models():
    globals()[_name] = _entrypoint(_name)
