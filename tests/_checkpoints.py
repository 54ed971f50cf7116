"""Helpers for the checkpoint tests: a five-news world with square cards, and what plain
transformers or timm compute over a checkpoint folder with the model's own preprocessing and
pooling, written independently of the extractors (the references the stores must equal).

The one deliberate difference: extraction resizes the whole card to the model's input size and
applies no centre crop (it would cut the cover off a wide IM-MIND card). The images here are
square, so CLIP's, SigLIP's, ViT's and BLIP's processors crop nothing; for DINOv2 (resize to
256 then crop 224) and timm (crop_pct 0.9) the references are computed with the crop turned
off, everything else as the library does it.
Letters: B batch, L tokens, D width.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TITLES = [
    "Stocks rally as markets rise on earnings",
    "Local team wins the championship final",
    "New phone launches with a bigger screen",
    "Storm brings heavy rain to the coast",
    "Chef shares a simple pasta recipe",
]
IMAGE_SIDE = 48  # larger than the tiny models' 32: the resize is exercised


def write_world(root: Path) -> Path:
    """news.tsv with TITLES as N1..N5, and square JPEG cards for N1..N4 (N5 has none)."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = [f"N{i + 1}\tnews\tgeneral\t{title}\tAn abstract.\thttps://example.org/{i}\t[]\t[]"
             for i, title in enumerate(TITLES)]
    (root / "news.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ys, xs = np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE]
    for i in range(4):
        pixels = np.stack([(xs * (3 + i) + 40 * i) % 256, (ys * (5 - i) + 90) % 256,
                           ((xs + ys) * 2 + 60 * i) % 256], axis=-1).astype(np.uint8)  # (S, S, 3) smooth ramps
        pixels[(ys // 12 + xs // 12 + i) % 2 == 1] //= 2  # and blocks
        Image.fromarray(pixels).save(images / f"N{i + 1}.jpg", quality=95)
    return root


def world_images(root: Path) -> list[Image.Image]:
    return [Image.open(root / "images" / f"N{i + 1}.jpg").convert("RGB") for i in range(4)]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of (B, D) arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@torch.no_grad()
def reference_text(path: Path, pooling: str, titles=TITLES, max_length: int = 32) -> np.ndarray:
    """(B, D): AutoTokenizer + AutoModel, pooled as asked; `model` as sentence-transformers does."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path)).eval()
    batch = tokenizer(list(titles), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    hidden = model(**batch).last_hidden_state  # (B, L, D)
    weights = batch["attention_mask"].unsqueeze(-1).float()  # (B, L, 1)
    mean = (hidden * weights).sum(1) / weights.sum(1)
    if pooling == "cls":
        return hidden[:, 0].numpy()
    if pooling == "mean":
        return mean.numpy()
    cfg = json.loads((path / "1_Pooling" / "config.json").read_text())
    parts = []
    if cfg.get("pooling_mode_cls_token"):
        parts.append(hidden[:, 0])
    if cfg.get("pooling_mode_max_tokens"):
        parts.append(hidden.masked_fill(weights == 0, -1e9).max(1).values)
    if cfg.get("pooling_mode_mean_tokens"):
        parts.append(mean)
    vectors = torch.cat(parts, -1)
    modules = json.loads((path / "modules.json").read_text())
    if any(m["type"].endswith("Normalize") for m in modules):
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
    return vectors.numpy()


def _as_tensor(out) -> torch.Tensor:
    """get_image_features returns a tensor in transformers 4 and an output object in 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def reference_vision(family: str, path: Path, images, pooling: str) -> np.ndarray:
    """(B, D) for `images` as the library itself preprocesses and pools them."""
    if family == "timm":
        import timm

        model = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
        config = timm.data.resolve_data_config({}, model=model)
        transform = timm.data.create_transform(**{**config, "crop_pct": 1.0})
        pixels = torch.stack([transform(img) for img in images])
        tokens = model.forward_features(pixels)
        return (tokens[:, 0] if pooling == "cls" else model.forward_head(tokens, pre_logits=True)).numpy()

    import transformers

    processor = transformers.AutoImageProcessor.from_pretrained(str(path))
    options = {}
    if family == "DINOv2":
        crop = processor.crop_size
        options = {"do_center_crop": False, "size": {"height": crop["height"], "width": crop["width"]}}
    pixels = processor(images=images, return_tensors="pt", **options)["pixel_values"]
    if family == "ViT":
        model = transformers.ViTForImageClassification.from_pretrained(str(path)).eval()
        return model.vit(pixels).last_hidden_state[:, 0].numpy()
    if family == "CLIP":
        model = transformers.CLIPModel.from_pretrained(str(path)).eval()
        if pooling == "model":
            return _as_tensor(model.get_image_features(pixel_values=pixels)).numpy()
        return model.vision_model(pixel_values=pixels).pooler_output.numpy()
    if family == "SigLIP":
        model = transformers.SiglipModel.from_pretrained(str(path)).eval()
        return _as_tensor(model.get_image_features(pixel_values=pixels)).numpy()
    if family == "DINOv2":
        return transformers.Dinov2Model.from_pretrained(str(path)).eval()(pixel_values=pixels).pooler_output.numpy()
    raise ValueError(family)


@torch.no_grad()
def reference_blip(path: Path, images, titles) -> dict[str, np.ndarray]:
    """BlipForImageTextRetrieval with its processor: the image-grounded [CLS] the matching
    head reads, and the normalised image and text embeddings of its retrieval pair."""
    from transformers import AutoProcessor, BlipForImageTextRetrieval

    processor = AutoProcessor.from_pretrained(str(path))
    model = BlipForImageTextRetrieval.from_pretrained(str(path)).eval()
    inputs = processor(images=images, text=list(titles), padding=True, truncation=True, max_length=32,
                       return_tensors="pt")
    matched = model(**inputs, use_itm_head=True)
    paired = model(**inputs, use_itm_head=False)
    normalize = torch.nn.functional.normalize
    return {
        "vectors": matched.question_embeds[:, 0].numpy(),
        "image_embeds": normalize(model.vision_proj(paired.last_hidden_state[:, 0]), dim=-1).numpy(),
        "text_embeds": normalize(model.text_proj(paired.question_embeds[:, 0]), dim=-1).numpy(),
    }
