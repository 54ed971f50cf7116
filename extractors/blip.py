"""`blip`: transformers BLIP over a news title and its card together.

Three vectors per news: the image embedding, the text embedding, and the image-grounded text
embedding (the text encoder cross-attending to the image: BLIP's image-text matching state),
which is the multimodal vector this extractor stores as `vectors`. `blip:tiny` is a 2-layer
BLIP with seeded random weights and the tiny text tokenizer; `blip:NAME` or `blip:/dir` loads
`BlipForImageTextRetrieval` with its processor (e.g. Salesforce/blip-itm-base-coco).
Letters: B batch, L tokens, P patches, D width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from extractors.checkpoints import load_or_explain
from extractors.config import ExtractorConfig, default_pooling
from extractors.encoded import Encoded, pool, set_trainable, tokenize_titles
from extractors.images import ImageTransform
from extractors.registry import register
from extractors.text import _tiny_tokenizer

TINY_BLIP_IMAGE = (64, 192)


class BlipExtractor(nn.Module):
    """(titles, pixels) -> multimodal vectors (B, D); image and text embeddings alongside."""

    modality = "multimodal"

    def __init__(self, config: ExtractorConfig, model: nn.Module, tokenizer):
        super().__init__()
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.dim = int(model.config.text_config.hidden_size)
        self.projection_dim = int(model.config.image_text_hidden_size)
        self.transform = ImageTransform(
            size=config.image_size, mean=config.mean, std=config.std, crop=config.crop, interpolation=config.interpolation
        )
        self.set_trainable(False)

    def set_trainable(self, trainable: bool) -> None:
        set_trainable(self, trainable)

    def tokenize(self, titles: Sequence[str]) -> dict[str, torch.Tensor]:
        return tokenize_titles(self.tokenizer, titles, self.config.max_length)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixels: torch.Tensor, return_tokens: bool = False
    ) -> Encoded:
        image = self.model.vision_model(pixel_values=pixels).last_hidden_state  # (B, P, Dv)
        image_mask = torch.ones(image.shape[:2], dtype=torch.long, device=image.device)  # (B, P)
        grounded = self.model.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask,
            encoder_hidden_states=image, encoder_attention_mask=image_mask,
        ).last_hidden_state  # (B, L, D)
        mask = attention_mask.bool()  # (B, L)
        vectors = pool(grounded, mask, self.config.pooling)  # (B, D)
        text = self.model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, D)
        extras = {
            "image_vectors": nn.functional.normalize(self.model.vision_proj(image[:, 0]), dim=-1),  # (B, E)
            "text_vectors": nn.functional.normalize(self.model.text_proj(text[:, 0]), dim=-1),  # (B, E)
        }
        return Encoded(vectors, grounded if return_tokens else None, mask if return_tokens else None, extras)

    @torch.inference_mode()
    def encode(self, titles: Sequence[str], pixels: torch.Tensor, return_tokens: bool = False) -> Encoded:
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in self.tokenize(titles).items()}
        return self(**batch, pixels=pixels.to(device, non_blocking=True), return_tokens=return_tokens)


def build_tiny_blip(vocab_size: int, pad_token_id: int, max_length: int, seed: int) -> nn.Module:
    from transformers import BlipConfig, BlipForImageTextRetrieval

    width = 64
    config = BlipConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=width, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, encoder_hidden_size=width, max_position_embeddings=max(max_length, 64),
            pad_token_id=pad_token_id, bos_token_id=None, sep_token_id=None,
        ),
        vision_config=dict(
            hidden_size=width, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            image_size=TINY_BLIP_IMAGE[0], patch_size=16,
        ),
        projection_dim=32,
        image_text_hidden_size=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BlipForImageTextRetrieval(config)


@register("blip")
def create_blip(
    checkpoint: str = "tiny",
    *,
    titles: Sequence[str] | None = None,
    workdir: str | Path | None = None,
    crop: str = "card",
    missing: str = "card",
    pooling: str | None = None,
    max_length: int = 32,
    seed: int = 0,
    **_: object,
) -> BlipExtractor:
    config = ExtractorConfig(
        name="blip", checkpoint=checkpoint, modality="multimodal", pooling=default_pooling(checkpoint, pooling),
        max_length=max_length,
        crop=crop, missing=missing, seed=seed,
    )
    if config.is_tiny:
        tokenizer = _tiny_tokenizer(titles, workdir)
        side = TINY_BLIP_IMAGE[0]
        config = replace(config, image_size=(side, side))
        model = build_tiny_blip(len(tokenizer), tokenizer.pad_token_id, max_length, seed)
        return BlipExtractor(config, model, tokenizer)

    from transformers import BlipForImageTextRetrieval, BlipProcessor

    processor = load_or_explain("BLIP", checkpoint, BlipProcessor.from_pretrained)
    model = load_or_explain("BLIP", checkpoint, BlipForImageTextRetrieval.from_pretrained)
    images = processor.image_processor
    # transformers 5 gives a SizeDict (not a dict subclass), older versions a dict or an int.
    side = int(images.size) if isinstance(images.size, int) else int(images.size["height"])
    config = replace(
        config, image_size=(side, side), mean=tuple(images.image_mean), std=tuple(images.image_std),
        interpolation="bicubic",
    )
    return BlipExtractor(config, model, processor.tokenizer)
