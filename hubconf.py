"""torch.hub entry points: ``torch.hub.load("<repo dir>", "t2t_vit_14", source="local")``.

One entry point per registered model, generated from :func:`t2t_vit.list_models`. Nothing is
downloaded: pass ``checkpoint_path=`` (with ``pretrained=True``) to load local weights.
"""
import sys as _sys
from pathlib import Path as _Path

dependencies = ["torch", "timm"]

_SRC = str(_Path(__file__).resolve().parent / "src")
if _SRC not in _sys.path:
    _sys.path.insert(0, _SRC)

import t2t_vit as _t2t_vit  # noqa: E402


def _entrypoint(name):
    def entrypoint(pretrained=False, checkpoint_path=None, **kwargs):
        return _t2t_vit.create_model(name, pretrained=pretrained, checkpoint_path=checkpoint_path, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = _t2t_vit.VARIANTS[name].note or f"{name} (T2T-ViT); kwargs go to t2t_vit.create_model."
    return entrypoint


for _name in _t2t_vit.list_models():
    globals()[_name] = _entrypoint(_name)
