"""What a checkpoint folder holds, read from its files alone (JSON, file names; no torch).

One table of the model families each extractor takes, and the readers of the files that say
how a checkpoint wants its input prepared and its output pooled:
- `config.json`: a transformers checkpoint (`model_type`) or a timm one (`architecture`);
- `preprocessor_config.json`: image size, mean, std and resampling (`image_prep`);
- sentence-transformers' `modules.json`, `1_Pooling/config.json` and
  `sentence_bert_config.json`: how the model pools its tokens into a sentence vector, whether
  it normalises it, and its maximum length (`sentence_pooling`).
The checkpoint resolver (extractors/checkpoints.py) refuses a folder these readers cannot make
sense of before any model code is imported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.errors import PipelineError

# model_type -> the family's name in messages. Every one keeps its [CLS] / <s> at position 0.
TEXT_TYPES = {
    "bert": "BERT", "distilbert": "DistilBERT", "roberta": "RoBERTa", "xlm-roberta": "XLM-RoBERTa",
    "camembert": "CamemBERT", "deberta": "DeBERTa", "deberta-v2": "DeBERTa-v2/v3", "electra": "ELECTRA",
    "mpnet": "MPNet", "albert": "ALBERT", "mobilebert": "MobileBERT", "modernbert": "ModernBERT",
}
# transformers vision towers the `vit` extractor runs (timm checkpoints are taken as well).
VISION_TYPES = {
    "vit": "ViT", "clip": "CLIP", "clip_vision_model": "CLIP", "siglip": "SigLIP", "siglip_vision_model": "SigLIP",
    "dinov2": "DINOv2",
}
BLIP_TYPES = {"blip": "BLIP"}
BLIP_RETRIEVAL = "BlipForImageTextRetrieval"
OTHER_MULTIMODAL = {"blip-2": "BLIP-2", "instructblip": "InstructBLIP", "siglip2": "SigLIP 2", "llava": "LLaVA"}

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
OTHER_WEIGHTS = ("tf_model.h5", "flax_model.msgpack", "open_clip_pytorch_model.bin", "open_clip_model.safetensors")
SENTENCEPIECE_FILES = ("spm.model", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", *SENTENCEPIECE_FILES)

# PIL's resampling codes, as preprocessor_config.json writes them.
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_IMAGENET_STANDARD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_IMAGENET_DEFAULT = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
# Defaults of the image processors (transformers 5), for keys a preprocessor_config.json leaves out.
_PROCESSOR_DEFAULTS = {
    "ViT": ("bilinear", _IMAGENET_STANDARD), "CLIP": ("bicubic", _OPENAI_CLIP),
    "Siglip": ("bicubic", _IMAGENET_STANDARD), "Bit": ("bicubic", _OPENAI_CLIP), "Blip": ("bicubic", _OPENAI_CLIP),
}


def read_json(path: Path) -> Any:
    """A checkpoint's JSON file, or a PipelineError naming the file, the line and the fix."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PipelineError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); copy the file again from the "
                            "checkpoint it came from") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PipelineError(f"{path}: cannot be read ({err}); check the file and its permissions") from None


def weight_files(folder: Path) -> list[str]:
    """The PyTorch-loadable weight files of a checkpoint folder (safetensors first)."""
    return [name for name in WEIGHT_FILES if (folder / name).is_file()]


def tokenizer_files(folder: Path) -> list[str]:
    return [name for name in TOKENIZER_FILES if (folder / name).is_file()]


# ---------------------------------------------------------------- images


@dataclass(frozen=True)
class ImagePrep:
    """How a checkpoint wants its pixels: resized to (height, width), then (x/255 - mean) / std.

    The processor's centre crop is not applied: a whole IM-MIND card (or its cover box) is
    resized to the model's input size, since a centre crop of the wide card would cut the
    cover away. For a square image the two agree.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str


def _side(value: Any, path: Path, key: str) -> tuple[int, int] | None:
    """(height, width) from an int, or a dict with height/width or shortest_edge."""
    if value is None:
        return None
    if isinstance(value, int) and value > 0:
        return value, value
    if isinstance(value, dict):
        if value.get("height") and value.get("width"):
            return int(value["height"]), int(value["width"])
        if value.get("shortest_edge"):
            return int(value["shortest_edge"]), int(value["shortest_edge"])
    raise PipelineError(f"{path}: `{key}` is {value!r}; expected a number or {{\"height\": H, \"width\": W}} "
                        "or {\"shortest_edge\": S}")


def image_prep(folder: Path) -> ImagePrep:
    """Read `preprocessor_config.json`: the model's input size, mean, std and resampling."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        raise PipelineError(f"{folder} has no preprocessor_config.json (the image size, mean and std of the model); "
                            "copy it from the same checkpoint")
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise PipelineError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    kind = str(cfg.get("image_processor_type") or cfg.get("feature_extractor_type") or "")
    defaults = next((d for prefix, d in _PROCESSOR_DEFAULTS.items() if kind.startswith(prefix)), None)
    size = _side(cfg.get("crop_size"), path, "crop_size") if cfg.get("do_center_crop") else None
    size = size or _side(cfg.get("size"), path, "size")
    resample = cfg.get("resample")
    interpolation = RESAMPLE.get(resample) if resample is not None else (defaults[0] if defaults else None)
    if cfg.get("do_normalize", True):
        mean, std = cfg.get("image_mean"), cfg.get("image_std")
        if (mean is None or std is None) and defaults:
            mean, std = mean or defaults[1][0], std or defaults[1][1]
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    missing = [k for k, v in (("size", size), ("resample", interpolation), ("image_mean", mean), ("image_std", std))
               if v is None]
    if missing:
        raise PipelineError(f"{path} does not say its {', '.join(missing)} (image processor {kind or 'unknown'}); "
                            "add them, or copy the file from the same checkpoint")
    if cfg.get("do_rescale", True) and abs(float(cfg.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-6:
        raise PipelineError(f"{path}: rescale_factor {cfg['rescale_factor']} is not 1/255, which this project assumes")
    if len(mean) != 3 or len(std) != 3:
        raise PipelineError(f"{path}: image_mean and image_std need three values (RGB), got {mean} and {std}")
    return ImagePrep(size, tuple(float(m) for m in mean), tuple(float(s) for s in std), interpolation)


# ---------------------------------------------------------------- sentence-transformers

ST_MODES = ("cls", "max", "mean", "mean_sqrt_len", "weightedmean", "lasttoken")
"""sentence-transformers' pooling modes, in the order it concatenates them."""
_ST_KEYS = {
    "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens", "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}


@dataclass(frozen=True)
class SentencePooling:
    """A sentence-transformers model's own pooling: `modes` concatenated, then L2-normalised
    when `normalize`. `model_dir` is the folder of its transformer (the root, or e.g.
    `0_Transformer` in older layouts); `unsupported` names modules after the pooling that
    this project does not run (a Dense projection...), which makes `model` pooling unavailable."""

    modes: tuple[str, ...]
    normalize: bool
    max_seq_length: int | None
    lowercase: bool
    model_dir: str
    unsupported: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return "+".join(self.modes + (("normalize",) if self.normalize else ()))


def sentence_pooling(folder: Path) -> SentencePooling | None:
    """The sentence-transformers pooling of `folder`, or None when it is no such model."""
    path = folder / "modules.json"
    if not path.is_file():
        return None
    modules = read_json(path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise PipelineError(f"{path}: expected a list of modules, found {type(modules).__name__}")
    model_dir, pooling_dir, normalize, unsupported = None, None, False, []
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        where = str(module.get("path", ""))
        if kind == "Transformer" and model_dir is None:
            model_dir = where
        elif kind == "Pooling" and pooling_dir is None:
            pooling_dir = where
        elif kind == "Normalize":
            normalize = True
        else:
            unsupported.append(f"{kind} ({where or 'root'})")
    if model_dir is None or pooling_dir is None:
        raise PipelineError(f"{path} lists no Transformer or no Pooling module; this project reads "
                            "sentence-transformers models made of a transformer, its pooling and an optional Normalize")
    cfg_path = folder / pooling_dir / "config.json"
    if not cfg_path.is_file():
        raise PipelineError(f"{cfg_path} is missing (the pooling that modules.json names); copy it from the checkpoint")
    cfg = read_json(cfg_path)
    modes = tuple(mode for mode in ST_MODES if cfg.get(_ST_KEYS[mode]))
    if isinstance(cfg.get("pooling_mode"), str) and not modes:
        modes = (cfg["pooling_mode"].replace("mean_sqrt_len_tokens", "mean_sqrt_len"),)
    unknown = [m for m in modes if m not in ST_MODES]
    if not modes or unknown:
        raise PipelineError(f"{cfg_path}: pooling {unknown or 'none'} is not one of {', '.join(ST_MODES)}")
    st_config = folder / model_dir / "sentence_bert_config.json"
    settings = read_json(st_config) if st_config.is_file() else {}
    max_len = settings.get("max_seq_length")
    return SentencePooling(modes, normalize, int(max_len) if max_len else None, bool(settings.get("do_lower_case")),
                           model_dir, tuple(unsupported))
