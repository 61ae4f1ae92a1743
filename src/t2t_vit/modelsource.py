"""Where a model and its weights come from, decided once from the text a user gave.

``--finetune`` and ``--teacher`` (and any other option that names a model) take one string: a
checkpoint file, a pretrained tag (``t2t_vit_14.in1k``: a T2T-ViT name and one of its released
weights) or a model name. :meth:`ModelSource.parse` makes that decision in one place; everything
after it reads the :class:`ModelSource`'s ``kind``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from timm.models import split_model_name_tag

from t2t_vit.table import is_t2t_vit


@dataclass(frozen=True)
class ModelSource:
    """``kind`` "file" (``text`` is an existing file), "tag" (``model`` + ``tag``, e.g. ``t2t_vit_14``
    + ``in1k``) or "name" (anything else: a T2T-ViT or timm model name, or a path that does not exist)."""

    kind: Literal["file", "tag", "name"]
    text: str
    model: str = ""  # the architecture a tag or a name builds ("" for a file: its metadata says)
    tag: str = ""

    @classmethod
    def parse(cls, text: str) -> ModelSource:
        if os.path.isfile(text):
            return cls("file", text)
        model, tag = split_model_name_tag(text)
        if tag and is_t2t_vit(model) and os.path.sep not in text:
            return cls("tag", text, model, tag)
        return cls("name", text, text)
