"""`vit`: vision transformers over IM-MIND cards, from timm or from transformers.

`vit:tiny` is a 2-layer timm ViT with seeded random weights on 64x192 inputs (the card's aspect
ratio, so the cover keeps its shape). A named checkpoint is what extractors.checkpoints
resolved: a timm model in its hub layout (`vit_base_patch16_224`, `timm/...`, `hf-hub:...`,
or a folder with timm's config.json + model.safetensors), or a transformers vision tower (ViT,
CLIP, SigLIP, DINOv2; extractors/hf_vision.py); extractors/vit.py picks which. Input size, mean, std and resampling come from
timm's data config or the checkpoint's preprocessor_config.json.

Pooling: `cls` is the class token as the model uses it, `mean` the mean of the stored token
vectors, `model` the model's own pooled output (timm's head before the classifier, SigLIP's
attention-pool head, CLIP's projection into the joint image-text space). The default is the
class token where the model pools by it, the model's pooled output otherwise; `cls` is refused
for a model without a class token.
Letters: B batch, P patches (+ prefix tokens), D width, Dt token width.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from extractors.checkpoints import Checkpoint, load_or_explain
from extractors.config import ExtractorConfig
from extractors.encoded import Encoded, set_trainable
from extractors.images import ImageTransform
from storage.errors import PipelineError

TINY_VISION = dict(patch_size=16, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0)


class TimmReader:
    """How a timm ViT-style model gives its tokens and pooled vectors."""

    def __init__(self, model: nn.Module):
        if not hasattr(model, "patch_embed") or not hasattr(model, "num_prefix_tokens"):
            raise ValueError(f"timm model {type(model).__name__} is not a vision transformer (no patch tokens); "
                             "the vit extractor takes ViT-style timm models")
        self.has_class_token = getattr(model, "cls_token", None) is not None
        self.num_tokens = int(model.patch_embed.num_patches + model.num_prefix_tokens)
        self.token_dim = int(getattr(model, "embed_dim", model.num_features))
        self.pooled_dim = int(model.num_features)
        pools_by_class = self.has_class_token and getattr(model, "global_pool", "") == "token"
        self.default_pooling = "cls" if pools_by_class else "model"

    def width(self, pooling: str) -> int:
        return self.pooled_dim if pooling == "model" else self.token_dim

    def __call__(self, model: nn.Module, pixels: torch.Tensor, pooling: str) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = model.forward_features(pixels)  # (B, P, Dt), final norm applied
        if pooling == "cls":
            return tokens, tokens[:, 0]  # (B, Dt)
        if pooling == "mean":
            return tokens, tokens.mean(1)  # (B, Dt)
        return tokens, model.forward_head(tokens, pre_logits=True)  # (B, D)


class VisionExtractor(nn.Module):
    """Pixels (B, 3, S, W) -> pooled vectors (B, D), token vectors (B, P, Dt) with a mask on request.

    `reader` says how the model gives tokens and pooled vectors (TimmReader, or
    extractors.hf_vision.HfVisionReader); `num_tokens` is P, the stored token count."""

    modality = "image"

    def __init__(self, config: ExtractorConfig, model: nn.Module, reader=None):
        super().__init__()
        reader = reader or TimmReader(model)
        if config.pooling == "cls" and not reader.has_class_token:
            raise PipelineError(f"{config.spec} has no class token; pass pooling model or mean")
        self.config = config
        self.model = model
        self.reader = reader
        self.dim = reader.width(config.pooling)
        self.token_dim = reader.token_dim
        self.num_tokens = reader.num_tokens
        self.transform = ImageTransform(
            size=config.image_size, mean=config.mean, std=config.std, crop=config.crop, interpolation=config.interpolation
        )
        self.set_trainable(False)

    def set_trainable(self, trainable: bool) -> None:
        set_trainable(self, trainable)

    def forward(self, pixels: torch.Tensor, return_tokens: bool = False) -> Encoded:
        tokens, vectors = self.reader(self.model, pixels, self.config.pooling)  # (B, P, Dt), (B, D)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)  # (B, P)
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


def timm_extractor(ckpt: Checkpoint, config: ExtractorConfig) -> VisionExtractor:
    """A timm checkpoint's extractor: input size, mean, std and resampling from timm's data config."""
    import timm

    def load() -> tuple[nn.Module, TimmReader]:
        model = timm.create_model(f"local-dir:{ckpt.path}", pretrained=True, num_classes=0).eval()
        return model, TimmReader(model)

    model, reader = load_or_explain(ckpt, "building the timm model", load)
    data = timm.data.resolve_model_data_config(model)
    config = replace(
        config, pooling=ckpt.pooling or reader.default_pooling, image_size=tuple(data["input_size"][1:]),
        mean=tuple(data["mean"]), std=tuple(data["std"]), interpolation=data.get("interpolation", "bicubic"),
        model_pooling=f"timm head ({getattr(model, 'global_pool', '') or 'none'})",
    )
    return VisionExtractor(config, model, reader)


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
