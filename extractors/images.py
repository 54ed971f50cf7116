"""Reading IM-MIND cards safely and turning them into model inputs.

Cards are read as RGB (never BGR): greyscale, CMYK, palette and RGBA images are converted
(transparency composited on white), a PNG saved under a `.jpg` name is read by its content.
Zero-byte, truncated or otherwise undecodable files are treated as missing and reported,
never decoded into silently wrong pixels. News without a usable image follow the `missing`
strategy: `card` renders the title-only card the way IM-MIND does, `blank` is a white card,
`zeros` gives a zero vector with `present = False`.
Letters: B batch, S image height, W image width.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

OK, CONVERTED, MISSING, CORRUPT = "ok", "converted", "missing", "corrupt"


def read_rgb(path: Path | None) -> tuple[Image.Image | None, str]:
    """The image at `path` as RGB, and how it went: ok, converted, missing or corrupt."""
    if path is None or not path.is_file():
        return None, MISSING
    try:
        if path.stat().st_size == 0:
            return None, CORRUPT
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decodes now: a truncated file fails here, not later in a worker
                if img.mode == "RGB" and img.format == "JPEG":
                    return img.copy(), OK
                return _to_rgb(img), CONVERTED
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None, CORRUPT


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, I, F, CMYK, P, YCbCr: PIL's conversions are colour-correct


def crop_cover(card: Image.Image) -> Image.Image:
    """The cover box (15,15)-(215,180) of an IM-MIND card, scaled if the card is not 610x195."""
    from storage.cards import CARD_SIZE, COVER_BOX

    sx, sy = card.width / CARD_SIZE[0], card.height / CARD_SIZE[1]
    x0, y0, x1, y1 = COVER_BOX
    return card.crop((round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy)))


@dataclass(frozen=True)
class ImageTransform:
    """Crop, resize to (height, width) and normalise with the model's own mean and std."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop: str = "card"
    interpolation: str = "bicubic"

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self.crop == "cover":
            img = crop_cover(img)
        resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[self.interpolation]
        img = img.resize((self.size[1], self.size[0]), resample)
        pixels = np.asarray(img, dtype=np.float32) / 255.0  # (S, W, 3), RGB order
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # (3, S, W)


class CardDataset(torch.utils.data.Dataset):
    """One item per news: (pixels (3, S, W), present, status). Decoding runs in DataLoader workers."""

    def __init__(
        self,
        paths: Sequence[Path | None],
        titles: Sequence[str],
        categories: Sequence[str],
        transform: ImageTransform,
        missing: str = "card",
    ):
        if missing not in ("card", "blank", "zeros"):
            raise ValueError(f"unknown missing-image strategy {missing!r}; known: card, blank, zeros")
        self.paths, self.titles, self.categories = list(paths), list(titles), list(categories)
        self.transform, self.missing = transform, missing

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool, str]:
        img, status = read_rgb(self.paths[i])
        if img is not None:
            return self.transform(img), True, status
        if self.missing == "zeros":
            return torch.zeros(3, *self.transform.size), False, status
        from storage.cards import CARD_SIZE, render_card

        if self.missing == "card":
            img = render_card(self.titles[i], self.categories[i])
        else:
            img = Image.new("RGB", CARD_SIZE, (255, 255, 255))
        return self.transform(img), False, status
