"""`vit:CHECKPOINT`, the registry's constructor: the tiny ViT, a timm model (extractors.vision)
or a transformers vision tower (extractors.hf_vision), as extractors.checkpoints resolved it."""

from __future__ import annotations

from dataclasses import replace

from extractors.checkpoints import ensure_available
from extractors.hf_vision import hf_vision_extractor
from extractors.vision import VisionExtractor, build_tiny_vit, timm_extractor


def create_vit(
    checkpoint: str = "tiny", *, crop: str = "card", missing: str = "card", pooling: str | None = None, seed: int = 0,
    **_: object,
) -> VisionExtractor:
    """Build `vit:CHECKPOINT`; size, mean, std and resampling come from the checkpoint."""
    ckpt = ensure_available("vit", checkpoint, pooling)
    if ckpt.is_tiny:
        size = (64, 192) if crop == "card" else (96, 96)
        config = ckpt.extractor_config("image", image_size=size, crop=crop, missing=missing, seed=seed, max_length=0)
        return VisionExtractor(config, build_tiny_vit(size, seed))
    base = replace(ckpt, pooling=ckpt.pooling or "model").extractor_config(
        "image", crop=crop, missing=missing, seed=seed, max_length=0)
    if ckpt.format == "timm":
        return timm_extractor(ckpt, base)
    return hf_vision_extractor(ckpt, base)
