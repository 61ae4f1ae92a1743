"""Inference as a library: a model ready to classify, its preprocessing, batching and precision.

``load`` builds an :class:`Inference` from one of three sources of weights: a checkpoint file
(the model it describes, via :func:`t2t_vit.checkpoint.model_from_checkpoint`), a registered
model or pretrained tag (``t2t_vit.create_model(name, pretrained=True)``), or a model name alone
(random weights, for export and visualisation). The preprocessing is the evaluation transform the
weights were trained with: the checkpoint's ``data_config`` (mean, std, crop fraction,
interpolation) when it stores one, else timm's ``resolve_data_config`` for the model (its
pretrained config). Images are decoded by the training loader's reader
(:func:`t2t_vit.data.folder.load_image`), so a file gives the same pixels here as in training.

    from t2t_vit import inference
    clf = inference.load(checkpoint="runs/demo/checkpoint-best.safetensors")
    for path, top, error in clf.classify_files(["a.png", "b.jpg"], topk=3):
        ...

``runtime="openvino"`` or ``"onnxruntime"`` runs the same model on that runtime (CPU) with the
same preprocessing, batching and outputs (:mod:`t2t_vit.deploy`); ``int8=True`` with
``calib_data=DIR`` quantizes it after training, calibrated on the images of ``DIR``.

The ``predict``, ``visualize`` and ``export`` commands parse their arguments, call this module
and print.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping, Sequence, TypeVar

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

import t2t_vit
from t2t_vit import deploy
from t2t_vit.checkpoint import model_from_checkpoint
from t2t_vit.errors import T2TViTError
from t2t_vit.metadata import check_data_config
from t2t_vit.precision import PRECISIONS, check_precision, for_inference
from t2t_vit.runtime import default_device

CALIBRATION_IMAGES = 300  # NNCF's default subset size; more rarely moves int8 agreement
T = TypeVar("T")


# ---- preprocessing ---------------------------------------------------------------------------
def _stored_data_config(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's ``data_config`` as the loading layer checks it, without its input size."""
    stored = meta.get("data_config")
    if stored is None or stored == "":
        return {}
    config = check_data_config(stored)
    config.pop("input_size", None)  # the model's own size decides the crop
    return {k: tuple(v) if k in ("mean", "std") else v for k, v in config.items()}


def data_config(model: nn.Module, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Evaluation preprocessing for ``model``: timm's ``input_size``/``interpolation``/``mean``/
    ``std``/``crop_pct``/``crop_mode``.

    The checkpoint's stored ``data_config`` wins field by field over timm's
    ``resolve_data_config`` for the model. The input size is always the model's own (an
    ``--img-size`` override changes the model, so the crop follows it).
    """
    from timm.data import resolve_data_config

    args = {"input_size": (3, *model.img_size)} if hasattr(model, "img_size") else {}
    config = dict(resolve_data_config(args, model=model))
    config.update(_stored_data_config(meta or {}))
    return config


def eval_transform(config: Mapping[str, Any]) -> Callable[[Image.Image], Tensor]:
    """timm's evaluation transform (resize, centre crop, normalise) for a :func:`data_config`."""
    from timm.data import create_transform

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return create_transform(**{k: config[k] for k in keys if k in config}, is_training=False)


def read_image(path: str | Path) -> Image.Image:
    """An upright RGB image decoded as the training loader decodes it (16-bit greys scaled,
    EXIF orientation applied, decompression bombs refused); one sentence when it cannot be."""
    from t2t_vit.data.folder import load_image

    try:
        return load_image(str(path))
    except FileNotFoundError as err:
        raise T2TViTError(f"cannot read {str(path)!r}: no such file") from err
    except IsADirectoryError as err:
        raise T2TViTError(f"cannot read {str(path)!r}: it is a directory") from err
    except UnidentifiedImageError as err:
        raise T2TViTError(f"cannot read {str(path)!r}: not an image format PIL recognises") from err
    except Image.DecompressionBombError as err:
        raise T2TViTError(f"cannot read {str(path)!r}: image too large (decompression bomb)") from err
    except (OSError, ValueError, EOFError, SyntaxError) as err:  # PIL's ways of reporting damaged data
        raise T2TViTError(f"cannot read {str(path)!r}: {err}") from err


def class_names(num_classes: int, meta: Mapping[str, Any] | None = None, model: nn.Module | None = None) -> list[str]:
    """Names from the checkpoint, else the pretrained config's ``label_names``, else ImageNet's
    for 1000 classes, else ``class_<i>``."""
    for stored in ((meta or {}).get("class_names"), (getattr(model, "pretrained_cfg", None) or {}).get("label_names")):
        if isinstance(stored, (list, tuple)) and len(stored) == num_classes and num_classes:
            return [str(n) for n in stored]
    if num_classes == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(num_classes)]
    return [f"class_{i}" for i in range(num_classes)]


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    if size < 1:
        raise T2TViTError(f"batch size must be at least 1, got {size}")
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---- precision -------------------------------------------------------------------------------
def with_precision(model: nn.Module, precision: str) -> tuple[nn.Module, Callable[[], ContextManager], torch.dtype]:
    """(model, context each forward runs in, input dtype) for ``precision`` "fp32"|"bf16"|"fp16".

    The model itself becomes a low-precision model once (:func:`t2t_vit.for_inference`: its
    Performer feature maps stay fp32) and inputs are cast to that dtype; logits are turned to
    fp32 before the softmax.
    """
    dtype = PRECISIONS[check_precision(precision)]
    if dtype is None:
        return model, contextlib.nullcontext, torch.float32
    return for_inference(model, dtype), contextlib.nullcontext, dtype


def image_files(folder: str | Path) -> list[Path]:
    """The image files under ``folder`` (recursively, hidden ones skipped), sorted."""
    from t2t_vit.data.folder import images_under

    root = Path(folder)
    if not root.is_dir():
        raise T2TViTError(f"calibration folder {str(folder)!r} does not exist")
    files = sorted(map(Path, images_under(root)))
    if not files:
        raise T2TViTError(f"calibration folder {str(folder)!r} holds no images")
    return files


def calibration_batches(folder: str | Path, transform: Callable[[Image.Image], Tensor], batch_size: int = 8,
                        limit: int = CALIBRATION_IMAGES) -> list[Any]:
    """Up to ``limit`` images of ``folder``, preprocessed by ``transform``, as float32 numpy batches."""
    images = [transform(read_image(p)) for p in image_files(folder)[:limit]]
    return [torch.stack(chunk).float().numpy() for chunk in batched(images, batch_size)]


def on_runtime(model: nn.Module, config: Mapping[str, Any], runtime: str, precision: str = "fp32",
               int8: bool = False, calib_data: str | Path | None = None) -> nn.Module:
    """``model`` running on ``runtime`` (:func:`t2t_vit.deploy.on_runtime`, on the CPU); int8 is
    calibrated on the images of ``calib_data`` preprocessed with ``config``."""
    deploy.check(runtime, precision, int8)
    if int8 and calib_data is None:
        raise T2TViTError("int8 needs calibration images: --calib-data DIR")
    calibration = calibration_batches(calib_data, eval_transform(config)) if int8 else ()
    return deploy.on_runtime(model.cpu(), runtime, precision, int8, calibration)


# ---- the inference object --------------------------------------------------------------------
@dataclass
class Inference:
    """An eval-mode model with the preprocessing, class names and precision it runs with."""

    model: nn.Module
    config: dict[str, Any]
    class_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    description: str = "model"
    runtime: str = "torch"
    int8: bool = False
    calib_data: str | Path | None = None

    def __post_init__(self) -> None:
        self.model.eval()
        self.transform = eval_transform(self.config)
        if self.runtime == "torch" and not self.int8:
            self.model, self._context, self.input_dtype = with_precision(self.model, self.precision)
            return
        self.model = on_runtime(self.model, self.config, self.runtime, self.precision, self.int8, self.calib_data)
        self._context, self.input_dtype = contextlib.nullcontext, torch.float32

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tensor(self, images: Sequence[Image.Image]) -> Tensor:
        """The preprocessed batch (B, 3, H, W) on the model's device, in its input dtype."""
        return torch.stack([self.transform(im) for im in images]).to(self.device, self.input_dtype)

    @torch.no_grad()
    def logits(self, batch: Tensor) -> Tensor:
        """fp32 logits of a preprocessed batch."""
        with self._context():
            out = self.model(batch.to(self.device, self.input_dtype)).float()
        if not bool(torch.isfinite(out).all()):  # never a bare NaN in predict's JSON or a silent nan score
            raise T2TViTError(f"{self.description} produced NaN or Inf logits at {self.precision}; "
                              "its weights or this precision overflow (try --precision fp32)")
        return out

    def _top(self, logits: Tensor, topk: int) -> list[list[tuple[int, str, float]]]:
        k = max(1, min(topk, len(self.class_names)))
        probs, indices = logits.softmax(dim=-1).topk(k, dim=-1)
        return [[(i, self.class_names[i], p) for i, p in zip(i_row, p_row)]
                for p_row, i_row in zip(probs.tolist(), indices.tolist())]

    def classify(self, images: Sequence[Image.Image], topk: int = 5,
                 batch_size: int = 32) -> list[list[tuple[int, str, float]]]:
        """Top-k (index, class name, probability) per image, most probable first."""
        results: list[list[tuple[int, str, float]]] = []
        for batch in batched(images, batch_size):
            results += self._top(self.logits(self.tensor(batch)), topk)
        return results

    def classify_files(self, paths: Iterable[str | Path], topk: int = 5, batch_size: int = 32
                       ) -> Iterator[tuple[str, list[tuple[int, str, float]] | None, T2TViTError | None]]:
        """(path, top-k, None) per readable file and (path, None, error) per unreadable one, in
        order of the files; images are decoded one batch at a time, so any number of files fits."""
        for chunk in batched(paths, batch_size):
            readable, images, errors = [], [], {}
            for path in chunk:
                try:
                    images.append(read_image(path))
                    readable.append(str(path))
                except T2TViTError as err:
                    errors[str(path)] = err
            tops = dict(zip(readable, self.classify(images, topk, batch_size))) if images else {}
            for path in map(str, chunk):
                yield path, tops.get(path), errors.get(path)


def build_model(checkpoint: str | Path | None = None, model: str | None = None, pretrained: bool = False,
                use_ema: bool | None = None, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The model (not yet on a device) and the checkpoint's metadata ({} without a file).

    ``overrides`` (``img_size``, ``stem``, ...; None values ignored) win over the metadata.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if checkpoint is not None:
        if pretrained:
            raise T2TViTError("--checkpoint and --pretrained both name weights; give one of them")
        if not Path(checkpoint).exists():
            raise T2TViTError(f"checkpoint {str(checkpoint)!r} does not exist")
        return model_from_checkpoint(checkpoint, model, use_ema=use_ema, with_metadata=True, **overrides)
    if not model:
        raise T2TViTError("name the model: --model NAME (with --pretrained for released weights) "
                          "or --checkpoint FILE")
    return t2t_vit.create_model(model, pretrained=pretrained, **overrides), {}


def load(checkpoint: str | Path | None = None, model: str | None = None, pretrained: bool = False,
         device: str | torch.device | None = None, precision: str = "fp32", use_ema: bool | None = None,
         runtime: str = "torch", int8: bool = False, calib_data: str | Path | None = None,
         **overrides: Any) -> Inference:
    """An :class:`Inference` from a checkpoint, a pretrained tag or a model name (random weights).

    Args:
        checkpoint: our ``.safetensors``/``.pth``, the authors' ``.pth.tar``, or a
            ``save_pretrained`` directory; the model is the one it describes.
        model: a registered name or pretrained tag (``t2t_vit_14``, ``t2t_vit_14.in1k``); needed
            with a checkpoint only when the file does not name its model.
        pretrained: load the released weights of ``model`` (``create_model(..., pretrained=True)``).
        device: torch device; default :func:`t2t_vit.runtime.default_device`.
        precision: "fp32", "bf16" or "fp16".
        runtime: "torch", "openvino" or "onnxruntime" (the last two on the CPU).
        int8: quantize for ``runtime`` after training, calibrated on the images of ``calib_data``.
        overrides: model arguments that win over the checkpoint (``img_size=64``, ``stem="small"``).
    """
    deploy.check(runtime, precision, int8)
    if runtime != "torch" and device is not None and torch.device(device).type != "cpu":
        raise T2TViTError(f"runtime {runtime} runs on the CPU; leave out --device {device}")
    net, meta = build_model(checkpoint, model, pretrained, use_ema, **overrides)
    net = net.to(device or ("cpu" if runtime != "torch" else default_device())).eval()
    name = model or meta.get("model") or (getattr(net, "pretrained_cfg", None) or {}).get("architecture") or "model"
    weights = "" if checkpoint is not None or pretrained else " (random weights)"
    return Inference(net, data_config(net, meta), class_names(getattr(net, "num_classes", 0), meta, net), meta,
                     precision, f"{name}{weights}", runtime, int8, calib_data)


def predict(model: nn.Module, images: Sequence[Image.Image], names: Sequence[str], topk: int = 5,
            batch_size: int = 32, precision: str = "fp32", meta: Mapping[str, Any] | None = None
            ) -> list[list[tuple[int, str, float]]]:
    """Top-k (index, class name, probability) per image for a model already built.

    The preprocessing is :func:`data_config` of the model and ``meta`` (the checkpoint's
    metadata). With ``t2t_vit.for_inference`` a low ``precision`` converts ``model`` itself.
    """
    config = data_config(model, meta)
    return Inference(model, config, list(names), dict(meta or {}), precision).classify(images, topk, batch_size)
