"""`vit`: timm vision transformers over IM-MIND cards.

`vit:tiny` is a 2-layer ViT with seeded random weights on 64x192 inputs (the card's aspect
ratio, so the cover keeps its shape); `vit:NAME` loads a timm model (e.g.
`vit_base_patch16_224`) from the local cache, `vit:/local/dir` a folder in timm's hub format
(config.json + model.safetensors). Letters: B batch, P patches (+ prefix tokens), D width.
"""

from __future__ import annotations

import torch
from torch import nn

from extractors.checkpoints import load_or_explain, local_dir
from extractors.config import ExtractorConfig, default_pooling
from extractors.encoded import Encoded, pool, set_trainable
from extractors.images import ImageTransform

TINY_VISION = dict(patch_size=16, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0)


class VisionExtractor(nn.Module):
    """Pixels (B, 3, S, W) -> pooled vectors (B, D), patch vectors (B, P, D) with a mask on request."""

    modality = "image"

    def __init__(self, config: ExtractorConfig, model: nn.Module):
        super().__init__()
        self.config = config
        self.model = model
        self.dim = int(model.num_features)
        self.transform = ImageTransform(
            size=config.image_size, mean=config.mean, std=config.std, crop=config.crop, interpolation=config.interpolation
        )
        self.set_trainable(False)

    def set_trainable(self, trainable: bool) -> None:
        set_trainable(self, trainable)

    def forward(self, pixels: torch.Tensor, return_tokens: bool = False) -> Encoded:
        tokens = self.model.forward_features(pixels)  # (B, P, D), final norm applied
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)  # (B, P)
        vectors = pool(tokens, mask, self.config.pooling)  # (B, D)
        return Encoded(vectors, tokens if return_tokens else None, mask if return_tokens else None)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, return_tokens: bool = False) -> Encoded:
        device = next(self.model.parameters()).device
        return self(pixels.to(device, non_blocking=True), return_tokens=return_tokens)


def build_tiny_vit(image_size: tuple[int, int], seed: int) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VisionTransformer(img_size=image_size, num_classes=0, **TINY_VISION)


def create_vit(
    checkpoint: str = "tiny", *, crop: str = "card", missing: str = "card", pooling: str | None = None, seed: int = 0,
    **_: object,
) -> VisionExtractor:
    """Build `vit:CHECKPOINT`; mean, std, size and interpolation come from the model's data config."""
    if checkpoint == "tiny":
        size = (64, 192) if crop == "card" else (96, 96)
        config = ExtractorConfig(
            name="vit", checkpoint=checkpoint, modality="image", pooling=default_pooling(checkpoint, pooling), image_size=size,
            crop=crop, missing=missing, seed=seed, max_length=0,
        )
        return VisionExtractor(config, build_tiny_vit(size, seed))

    import timm

    def load(ref: str) -> nn.Module:
        name = f"local-dir:{ref}" if local_dir(checkpoint) else ref
        return timm.create_model(name, pretrained=True, num_classes=0)

    model = load_or_explain("vision", checkpoint, load)
    data = timm.data.resolve_model_data_config(model)
    config = ExtractorConfig(
        name="vit", checkpoint=checkpoint, modality="image", pooling=default_pooling(checkpoint, pooling),
        image_size=tuple(data["input_size"][1:]),
        mean=tuple(data["mean"]), std=tuple(data["std"]), interpolation=data.get("interpolation", "bicubic"),
        crop=crop, missing=missing, seed=seed, max_length=0,
    )
    return VisionExtractor(config, model)


def random_vit(model_name: str = "vit_base_patch16_224", seed: int = 0) -> VisionExtractor:
    """A timm ViT with seeded random weights and its own data config, as `vit:random-NAME`.

    Random weights cost exactly what pre-trained ones do, so the benchmarks time base-size
    models with no download.
    """
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(model_name, pretrained=False, num_classes=0)
    data = timm.data.resolve_model_data_config(model)
    config = ExtractorConfig(
        name="vit", checkpoint=f"random-{model_name}", modality="image", pooling="cls",
        image_size=tuple(data["input_size"][1:]), mean=tuple(data["mean"]), std=tuple(data["std"]),
        interpolation=data.get("interpolation", "bicubic"), max_length=0, seed=seed,
    )
    return VisionExtractor(config, model)
