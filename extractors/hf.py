"""Loading transformers models and tokenizers from a resolved folder: offline, strict and quiet.

Strict: a weight the model needs but the checkpoint lacks would be initialised at random and
give silently wrong vectors, so it is an error here (the loader's caller turns it into a
one-line PipelineError naming the checkpoint). Weights the checkpoint has and the model does
not use (a classifier head, CLIP's text tower under its vision tower) are fine. Quiet:
transformers' per-load report and progress bars are silenced for the load, then restored.
Weights are loaded as float32 whatever dtype they were saved in (extraction autocasts on a GPU).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """transformers logs errors only and shows no progress bar inside the block."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_model(cls, path: Path, config=None, ignore: tuple[str, ...] = (), **kwargs) -> nn.Module:
    """`cls.from_pretrained(path)` in evaluation mode; a weight the checkpoint lacks (outside
    `ignore` prefixes) or one of another shape raises ValueError."""
    with quiet():
        model, info = cls.from_pretrained(str(path), config=config, local_files_only=True, output_loading_info=True,
                                          dtype=torch.float32, **kwargs)
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(ignore))
    mismatched = list(info.get("mismatched_keys", ()))
    if missing or mismatched:
        shown = ", ".join(missing[:3] or [str(m[0]) for m in mismatched[:3]])
        raise ValueError(f"{len(missing) + len(mismatched)} weights of {cls.__name__} are missing from the checkpoint "
                         f"or of another shape (e.g. {shown}): it holds another model than its config.json says")
    return model.eval()


def load_text_encoder(path: Path) -> nn.Module:
    """The bare encoder of a text checkpoint (AutoModel), without a pooler it would not use."""
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    cls = MODEL_MAPPING[type(config)]
    extra = {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(cls.__init__).parameters else {}
    return load_model(AutoModel, path, config=config, **extra)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    with quiet():
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
