"""Masked-patch reconstruction (MAE) for the tiny ViT, on the train news' cards.

He et al.'s masked autoencoder at a tiny scale: each card (64x192, 4x12 patches of 16 px,
the extractor's own input) loses a random 75% of its patches; the tiny ViT of
extractors.vision (`TINY_VISION`) encodes the visible quarter with its class token; a
one-block decoder fills in mask tokens and predicts the pixels of every hidden patch; the
loss is the mean squared error on hidden patches, each patch's target normalised by its own
mean and variance ("norm_pix_loss", which the MAE paper found gives better features: a
patch's shape matters, its flat colour does not). No label, no click: only pixels.

The cards are those the extractors encode: a news with a cover has its IM-MIND card, a news
without one the title-only card (storage.cards). Only the encoder is saved, in timm's hub
layout (`config.json` with "architecture" and "model_args", `model.safetensors`), loadable by
`timm.create_model("local-dir:DIR")` and so by `vit:DIR`; its pretrained_cfg carries the input
size (3, 64, 192), mean and std 0.5 and bicubic resizing, which the extractor reads back.
The model is built with `global_pool="avg"` and `fc_norm=False`: timm's own pooling is the
mean of the patch tokens, and `forward_features` still ends with the final LayerNorm, as in
the tiny extractor. Neither MAE nor anything else trains the class token to summarise, so
the checkpoint expects mean pooling (`global_pool` says so to a reader of timm configs).
Letters: B batch, P patches (48), V visible patches, D width, E decoder width, Q patch pixels (768).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from extractors.pretraining.corpus import Corpus, card_pixels
from extractors.pretraining.loop import PretrainConfig, require
from extractors.vision import TINY_VISION

CARD_INPUT = (64, 192)  # (S, W): the tiny extractor's card size
MEAN = STD = (0.5, 0.5, 0.5)
ARCHITECTURE = "vit_tiny_patch16_224"  # timm's constructor; model_args set the tiny sizes


@dataclass(frozen=True)
class VitPretrainConfig(PretrainConfig):
    steps: int = 250
    batch_size: int = 64
    epochs: float = 8.0  # the small world: the 250 steps; the tiny world: 33
    lr: float = 3e-3
    warmup_steps: int = 25
    mask_ratio: float = 0.75
    decoder_dim: int = 64
    decoder_depth: int = 1
    norm_pix_loss: bool = True

    def check(self) -> None:
        super().check()
        require(self, 0 < self.mask_ratio < 1 and self.decoder_dim % 4 == 0 and self.decoder_depth >= 1,
                 "mask_ratio in (0, 1), decoder_dim a multiple of 4 (heads), decoder_depth >= 1")


def build_vit(seed: int) -> nn.Module:
    """The tiny ViT (extractors.vision's sizes) through timm's factory, so that timm records
    the arguments its hub export needs; avg global pool, final LayerNorm kept."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(
            ARCHITECTURE, pretrained=False, num_classes=0, img_size=CARD_INPUT, global_pool="avg", fc_norm=False,
            **TINY_VISION,
        )


class MaskedAutoencoder:
    """The MAE objective over the corpus' cards; `model` holds the encoder and the decoder."""

    def __init__(self, corpus: Corpus, config: VitPretrainConfig, seed: int, progress: bool = False):
        self.config = config
        self.pixels = card_pixels(corpus, CARD_INPUT, progress)  # (N, 3, S, W) uint8
        self.covers = sum(p is not None for p in corpus.image_paths)
        encoder = build_vit(seed)
        if encoder.no_embed_class or encoder.num_prefix_tokens != 1 or not isinstance(encoder.patch_embed.norm, nn.Identity):
            raise RuntimeError("the MAE forward assumes timm's class token with its own position embedding and a bare patch conv")
        p = encoder.patch_embed.patch_size[0]
        n_patches = encoder.patch_embed.num_patches
        width = encoder.embed_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.model = _MAE(encoder, width, config.decoder_dim, config.decoder_depth, n_patches, p * p * 3)
        self.patch = p
        # (1, 1, Q) per-pixel statistics in the patch layout (channel-major, see patchify)
        self.mean = torch.tensor(MEAN).repeat_interleave(p * p).view(1, 1, -1)
        self.std = torch.tensor(STD).repeat_interleave(p * p).view(1, 1, -1)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, W) -> (B, P, Q): patches in timm's row-major order, pixels in the patch
        embedding's (channel, row, column) order, so a patch times the flattened conv weight
        is exactly what timm's PatchEmbed computes."""
        b, c, h, w = x.shape
        p = self.patch
        x = x.reshape(b, c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)

    def loss(self, generator: torch.Generator) -> torch.Tensor:
        cfg = self.config
        rows = torch.randperm(len(self.pixels), generator=generator)[: cfg.batch_size]
        raw = self.patchify(self.pixels[rows]).float()  # (B, P, Q) in 0..255
        x = (raw / 255.0 - self.mean) / self.std  # (B, P, Q) the model's input
        b, n = x.shape[:2]
        keep = max(1, round(n * (1 - cfg.mask_ratio)))
        order = torch.argsort(torch.rand(b, n, generator=generator), dim=1)  # (B, P) random per card
        visible, hidden = order[:, :keep], order[:, keep:]  # (B, V), (B, P - V)
        pred = self.model(x, visible, hidden)  # (B, P - V, Q)
        target = torch.gather(raw, 1, hidden.unsqueeze(-1).expand(-1, -1, raw.shape[-1]))  # (B, P - V, Q)
        if cfg.norm_pix_loss:
            # Per-patch standardisation is blind to the input's affine normalisation: 0..255 will do.
            var, mean = torch.var_mean(target, dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6 * 255.0**2).sqrt()
        else:
            target = (target / 255.0 - self.mean) / self.std
        return ((pred - target) ** 2).mean()

    def save(self, folder: Path) -> None:
        from timm.models._hub import save_for_hf

        encoder = self.model.encoder.eval()
        data = dict(input_size=(3, *CARD_INPUT), mean=MEAN, std=STD, interpolation="bicubic", crop_pct=1.0)
        save_for_hf(encoder, str(folder), safe_serialization=True, data_config=data)
        # The base architecture's hub metadata (an ImageNet tag, its licence) is not ours.
        path = folder / "config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        cfg = config["pretrained_cfg"]
        for key in ("license", "hf_hub_id", "origin_url", "paper_ids", "paper_name", "notes"):
            cfg.pop(key, None)
        cfg["tag"] = "mmnews_mae"
        path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    def card(self) -> dict[str, Any]:
        return {
            "load_with": "vit:DIR",
            "pooling": "mean",
            "objective": f"masked autoencoder: {self.config.mask_ratio:.0%} of the card's patches hidden, their "
                         "per-patch normalised pixels reconstructed by a one-block decoder",
            "cards": len(self.pixels),
            "cards_with_cover": self.covers,
            "image_size": list(CARD_INPUT),
            "crop": "card",
        }


class _MAE(nn.Module):
    """timm ViT encoder over the visible patches + a small transformer decoder over all."""

    def __init__(self, encoder: nn.Module, width: int, dim: int, depth: int, n_patches: int, out: int):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.encoder = encoder
        self.n_patches = n_patches
        self.decoder_embed = nn.Linear(width, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(torch.randn(1, n_patches + 1, dim) * 0.02)
        self.decoder_blocks = nn.Sequential(*[Block(dim, num_heads=4, mlp_ratio=2.0) for _ in range(depth)])
        self.decoder_norm = nn.LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, out)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, x: torch.Tensor, visible: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Patches x (B, P, Q), visible (B, V) and hidden (B, P - V) indices -> hidden patches' pixels.

        Only the visible patches are embedded (timm's PatchEmbed conv as the matrix product it
        is on whole patches) and encoded; only the hidden ones are predicted.
        """
        vit = self.encoder
        conv = vit.patch_embed.proj  # (D, 3, p, p)
        gathered = torch.gather(x, 1, visible.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, V, Q)
        tokens = gathered @ conv.weight.flatten(1).T + conv.bias  # (B, V, D)
        pos = vit.pos_embed[0, 1:]  # (P, D)
        tokens = tokens + pos[visible]  # (B, V, D)
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        h = vit.norm(vit.blocks(vit.norm_pre(vit.pos_drop(torch.cat([cls, tokens], 1)))))  # (B, 1+V, D)
        h = self.decoder_embed(h)  # (B, 1+V, E)
        b, e = h.shape[0], h.shape[-1]
        full = self.mask_token.expand(b, self.n_patches, e).clone()  # (B, P, E)
        full.scatter_(1, visible.unsqueeze(-1).expand(-1, -1, e), h[:, 1:])
        full = torch.cat([h[:, :1], full], 1) + self.decoder_pos_embed  # (B, 1+P, E)
        out = self.decoder_norm(self.decoder_blocks(full))[:, 1:]  # (B, P, E)
        out = torch.gather(out, 1, hidden.unsqueeze(-1).expand(-1, -1, e))  # (B, P - V, E)
        return self.decoder_pred(out)  # (B, P - V, Q)
