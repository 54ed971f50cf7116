"""Reading IM-MIND cards safely and turning them into model inputs.

Cards are read as RGB (never BGR): greyscale, CMYK, palette and RGBA images are converted
(transparency composited on white), a PNG saved under a `.jpg` name is read by its content.
Zero-byte, truncated or otherwise undecodable files are treated as missing and reported,
never decoded into silently wrong pixels. So is an image of more than `MAX_PIXELS` pixels
(40 million, after JPEG draft scaling): a decompression bomb (a small file that decodes to
gigabytes) is refused from its header, before anything is decoded. The limit is this
module's, passed to no one: Pillow's own process-wide guard is left as it is. A JPEG much
larger than the model needs is decoded at a reduced scale (Pillow's draft mode: 1/2, 1/4 or
1/8, never below the size the crop and resize need), which costs a fraction of a full decode.
News without a usable image follow the `missing` strategy: `card` renders the title-only card the way IM-MIND does, `blank` is a white card,
`zeros` gives an all-zero model input with `present = False`.

Extraction keeps the workers' share small: a worker only decodes, crops and resizes, and hands
over uint8 pixels (`CardDataset(..., uint8=True)`, a quarter of the bytes to pin and copy);
`normalize` turns a whole batch into model input on the model's device. The float path
(`ImageTransform.__call__`) is the same two steps on the CPU, so both give the same pixels.
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
MAX_PIXELS = 40_000_000
"""Images with more pixels than this (after draft scaling) are refused as corrupt."""
RESAMPLING = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
              "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def read_rgb(path: Path | None, need: tuple[int, int] | None = None) -> tuple[Image.Image | None, str]:
    """The image at `path` as RGB, and how it went: ok, converted, missing or corrupt.

    `need` (width, height) is the smallest whole-image size the caller can use: a larger JPEG
    is decoded at the smallest draft scale still at least that large."""
    if path is None or not path.is_file():
        return None, MISSING
    try:
        if path.stat().st_size == 0:
            return None, CORRUPT
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if need is not None and img.format == "JPEG":
                    img.draft("RGB", need)  # header only: picks the decoder's scale
                if img.width * img.height > MAX_PIXELS:
                    return None, CORRUPT
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
        """Model input (3, S, W) float32 on the CPU."""
        return normalize(self.resize(img)[None], *self.stats(torch.device("cpu")))[0]

    def needed(self) -> tuple[int, int]:
        """(width, height): the smallest whole image whose crop still covers the model's input
        (a JPEG is draft-decoded no smaller than this)."""
        from storage.cards import CARD_SIZE, COVER_BOX

        height, width = self.size
        if self.crop != "cover":
            return width, height
        x0, y0, x1, y1 = COVER_BOX
        return -(-width * CARD_SIZE[0] // (x1 - x0)), -(-height * CARD_SIZE[1] // (y1 - y0))

    def resize(self, img: Image.Image) -> torch.Tensor:
        """Cropped and resized pixels (3, S, W) uint8, RGB order."""
        if self.crop == "cover":
            img = crop_cover(img)
        img = img.resize((self.size[1], self.size[0]), RESAMPLING[self.interpolation])
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy())  # (3, S, W)

    def stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std as (1, 3, 1, 1) float32 on `device`, for `normalize`."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return mean.to(device), std.to(device)


def normalize(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (B, 3, S, W) -> model input float32 (B, 3, S, W) on the same device:
    (x / 255 - mean) / std, the arithmetic of rankers.plmnr's raw-news bank."""
    return (pixels.float() / 255.0 - mean) / std


def worker_context(num_workers: int):
    """The multiprocessing context of DataLoader workers decoding cards: `forkserver` where
    there is one (Linux), else the platform's default. A forked worker inherits its parent's
    threads' locks and state: forked from a process running Prefect (a flow, or any test after a
    Prefect harness) every worker died at once ("DataLoader worker exited unexpectedly with exit
    code 1"); workers started by a fork server, which holds no such threads, run."""
    import multiprocessing

    if num_workers > 0 and "forkserver" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("forkserver")
    return None


class CardDataset(torch.utils.data.Dataset):
    """One item per news: (pixels (3, S, W), present, status). Decoding runs in DataLoader workers.

    pixels are the model input (float32), or with `uint8=True` the resized pixels for `normalize`
    to finish in batches; under `zeros` a missing image is then uint8 zeros, and the caller zeroes
    those rows after normalising (their `present` is False). The stand-ins that do not depend on
    the news (`blank`, and `card` cropped to the cover) are made once per dataset copy.
    """

    def __init__(
        self,
        paths: Sequence[Path | None],
        titles: Sequence[str],
        categories: Sequence[str],
        transform: ImageTransform,
        missing: str = "card",
        uint8: bool = False,
    ):
        if missing not in ("card", "blank", "zeros"):
            raise ValueError(f"unknown missing-image strategy {missing!r}; known: card, blank, zeros")
        self.paths, self.titles, self.categories = list(paths), list(titles), list(categories)
        self.transform, self.missing, self.uint8 = transform, missing, uint8
        self._constant: torch.Tensor | None = None  # (3, S, W) uint8: the stand-in shared by every news

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool, str]:
        img, status = read_rgb(self.paths[i], self.transform.needed())
        present = img is not None
        if present:
            pixels = self.transform.resize(img)
        elif self.missing == "zeros":
            zeros = torch.zeros(3, *self.transform.size, dtype=torch.uint8 if self.uint8 else torch.float32)
            return zeros, False, status
        else:
            pixels = self._stand_in(i)
        if self.uint8:
            return pixels, present, status
        return normalize(pixels[None], *self.transform.stats(torch.device("cpu")))[0], present, status

    def _stand_in(self, i: int) -> torch.Tensor:
        """(3, S, W) uint8 pixels shown for news i, which has no usable image."""
        from storage.cards import CARD_SIZE, render_card

        if self.missing == "card" and self.transform.crop == "card":
            return self.transform.resize(render_card(self.titles[i], self.categories[i]))
        if self._constant is None:
            # A title-only card leaves its cover box white (the title starts right of it), so
            # cropped to the cover it is the blank card's crop, whatever the title.
            self._constant = self.transform.resize(Image.new("RGB", CARD_SIZE, (255, 255, 255)))
        return self._constant.clone()
