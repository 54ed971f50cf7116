"""`blip`: transformers BLIP over a news title and its card together.

Three vectors per news, as `BlipForImageTextRetrieval` computes them: the image-grounded text
embedding (the text encoder cross-attending to the image; its [CLS] is what the image-text
matching head reads), stored as `vectors`; and BLIP's unimodal embeddings in the joint
image-text space, returned as `extras`: `image_embeds` (the normalised projection of the image
[CLS]) and `text_embeds` (that of the text alone), BLIP's retrieval pair (`use_itm_head=False`).
`blip:tiny` is a 2-layer BLIP with seeded random weights and the tiny text tokenizer;
`blip:NAME` or `blip:/dir` loads a retrieval checkpoint (Salesforce/blip-itm-{base,large}-
{coco,flickr}) with its tokenizer, and its image size, mean, std and resampling from
preprocessor_config.json. Pooling of the grounded tokens: `cls` (default; `model` is the same)
or `mean`.
Letters: B batch, L tokens, P patches, D width, E joint-space width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from extractors.checkpoints import ensure_available, load_or_explain
from extractors.config import ExtractorConfig
from extractors.encoded import Encoded, pool, prepare_titles, set_trainable, tokenize_titles
from extractors.images import ImageTransform
from extractors.tokenizer import tiny_tokenizer

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
        self.token_dim = self.dim
        self.num_tokens = int(config.max_length)
        self.projection_dim = int(model.config.image_text_hidden_size)
        # What `forward` returns in Encoded.extras, and the store keeps beside the vectors (name -> E).
        self.extras = {"image_embeds": self.projection_dim, "text_embeds": self.projection_dim}
        self.transform = ImageTransform(
            size=config.image_size, mean=config.mean, std=config.std, crop=config.crop, interpolation=config.interpolation
        )
        self.set_trainable(False)

    def set_trainable(self, trainable: bool) -> None:
        set_trainable(self, trainable)

    def prepare_titles(self, titles: Sequence[object]) -> list[str]:
        """The text the tokenizer is given (cut to a sane length)."""
        return prepare_titles(titles, self.config.max_length)

    def tokenize(self, titles: Sequence[str]) -> dict[str, torch.Tensor]:
        return tokenize_titles(self.tokenizer, self.prepare_titles(titles), self.config.max_length)

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
        vectors = pool(grounded, mask, "cls" if self.config.pooling == "model" else self.config.pooling)  # (B, D)
        text = self.model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, D)
        extras = {
            "image_embeds": nn.functional.normalize(self.model.vision_proj(image[:, 0]), dim=-1),  # (B, E)
            "text_embeds": nn.functional.normalize(self.model.text_proj(text[:, 0]), dim=-1),  # (B, E)
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
        # transformers' BLIP vision default initializer_range is 1e-10: the random tower would
        # give every card the same embedding (pairwise cosine 1.0). 0.02 is BERT's and ViT's.
        vision_config=dict(
            hidden_size=width, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            image_size=TINY_BLIP_IMAGE[0], patch_size=16, initializer_range=0.02,
        ),
        projection_dim=32,
        image_text_hidden_size=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BlipForImageTextRetrieval(config)


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
    ckpt = ensure_available("blip", checkpoint, pooling)
    config = ckpt.extractor_config("multimodal", max_length=max_length, crop=crop, missing=missing, seed=seed)
    if ckpt.is_tiny:
        tokenizer = tiny_tokenizer(titles, workdir)
        side = TINY_BLIP_IMAGE[0]
        config = replace(config, image_size=(side, side))
        model = build_tiny_blip(len(tokenizer), tokenizer.pad_token_id, max_length, seed)
        return BlipExtractor(config, model, tokenizer)

    from transformers import BlipForImageTextRetrieval

    from extractors.hf import load_model, load_tokenizer

    tokenizer = load_or_explain(ckpt, "loading the tokenizer", lambda: load_tokenizer(ckpt.path))
    model = load_or_explain(ckpt, "loading the BLIP model", lambda: load_model(BlipForImageTextRetrieval, ckpt.path))
    prep = ckpt.image
    limit = int(getattr(model.config.text_config, "max_position_embeddings", max_length) or max_length)
    config = replace(config, image_size=prep.size, mean=prep.mean, std=prep.std, interpolation=prep.interpolation,
                     max_length=min(max_length, limit))
    return BlipExtractor(config, model, tokenizer)
