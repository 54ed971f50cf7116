"""transformers vision towers for the `vit` extractor: ViT, CLIP, SigLIP and DINOv2.

Each is loaded from the folder extractors.checkpoints resolved, with only its vision weights:
`ViTModel` (a ViTForImageClassification checkpoint such as google/vit-base-patch16-224 loses
its classifier), `CLIPVisionModelWithProjection` (a full CLIPModel checkpoint loses its text
tower; its vision config gets the checkpoint's projection width), `SiglipVisionModel`,
`Dinov2Model`. What each stores (tokens: `last_hidden_state`):

| family | cls                                   | model                                    |
|--------|---------------------------------------|------------------------------------------|
| ViT    | class token after the final norm      | the same (what the classifier reads)     |
| CLIP   | `pooler_output`: post-norm class token| `image_embeds`: its projection (joint space) |
| SigLIP | refused: it has no class token        | `pooler_output`: the attention-pool head |
| DINOv2 | `pooler_output`: normed class token   | the same                                 |

Letters: B batch, P tokens, D width, Dt token width.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from extractors.checkpoints import Checkpoint, load_or_explain
from extractors.config import ExtractorConfig
from extractors.vision import VisionExtractor


class HfVisionReader:
    """How a transformers vision tower of `family` gives its tokens and pooled vectors at `size`."""

    def __init__(self, model: nn.Module, family: str, size: tuple[int, int]):
        self.family = family
        tower = model.config
        patch = int(tower.patch_size)
        self.has_class_token = family != "SigLIP"
        self.num_tokens = (size[0] // patch) * (size[1] // patch) + int(self.has_class_token)
        self.token_dim = int(tower.hidden_size)
        self.pooled_dim = int(getattr(tower, "projection_dim", 0)) if family == "CLIP" else self.token_dim
        native = getattr(tower, "image_size", None)
        native = (native, native) if isinstance(native, int) else tuple(native or size)
        # DINOv2 always interpolates its position embeddings; the others only when asked.
        self.interpolate = family != "DINOv2" and tuple(size) != native

    def width(self, pooling: str) -> int:
        return self.pooled_dim if pooling == "model" else self.token_dim

    def __call__(self, model: nn.Module, pixels: torch.Tensor, pooling: str) -> tuple[torch.Tensor, torch.Tensor]:
        extra = {"interpolate_pos_encoding": True} if self.interpolate else {}
        if self.family == "CLIP":  # its pooled output, under the projection
            out = model.vision_model(pixel_values=pixels, **extra)
        else:
            out = model(pixel_values=pixels, **extra)
        tokens = out.last_hidden_state  # (B, P, Dt)
        if pooling == "mean":
            return tokens, tokens.mean(1)  # (B, Dt)
        if self.family == "ViT":
            return tokens, tokens[:, 0]  # (B, Dt): ViT's last_hidden_state is already normed
        if self.family == "CLIP" and pooling == "model":
            return tokens, model.visual_projection(out.pooler_output)  # (B, D)
        return tokens, out.pooler_output  # (B, Dt)


def _load(ckpt: Checkpoint) -> nn.Module:
    from transformers import AutoConfig, CLIPVisionModelWithProjection, Dinov2Model, SiglipVisionModel, ViTModel

    from extractors.hf import load_model

    if ckpt.family == "ViT":
        return load_model(ViTModel, ckpt.path, add_pooling_layer=False)
    if ckpt.family == "DINOv2":
        return load_model(Dinov2Model, ckpt.path)
    config = AutoConfig.from_pretrained(str(ckpt.path), local_files_only=True)
    if ckpt.family == "CLIP":
        vision = config.vision_config if hasattr(config, "vision_config") else config
        # A full CLIP config keeps the projection width at its top level, not in vision_config.
        vision.projection_dim = int(getattr(config, "projection_dim", vision.projection_dim))
        return load_model(CLIPVisionModelWithProjection, ckpt.path, config=vision)
    if ckpt.family == "SigLIP":
        vision = config.vision_config if hasattr(config, "vision_config") else config
        return load_model(SiglipVisionModel, ckpt.path, config=vision)
    raise ValueError(f"no transformers vision tower for family {ckpt.family!r}")


def hf_vision_extractor(ckpt: Checkpoint, config: ExtractorConfig) -> VisionExtractor:
    """The `vit` extractor over a transformers vision checkpoint (preflight done: `ckpt`)."""
    model = load_or_explain(ckpt, f"loading the {ckpt.family} vision tower", lambda: _load(ckpt))
    prep = ckpt.image
    config = replace(config, pooling=ckpt.pooling, image_size=prep.size, mean=prep.mean, std=prep.std,
                     interpolation=prep.interpolation)
    return VisionExtractor(config, model, HfVisionReader(model, ckpt.family, prep.size))
