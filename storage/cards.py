"""IM-MIND "impression cards": the 610x195 image a reader saw for one news.

The layout follows IM-MIND (ACM MM 2021): a white card, the cover at the left inside the
box (15,15)-(215,180) (200x165 px, the region later work crops), the title at the right
(x = 228, font size 27, at most 3 lines of about 27 characters, an ellipsis when cut) and
the category under it. News without a cover get the same card with the title only, which
is how extractors render a stand-in for a missing image (`render_card(title, category)`).

`draw_cover` paints the synthetic world's covers (see storage/synthetic.py).

Text uses Pillow's embedded default font (`ImageFont.load_default(size=...)`), so a card is
the same bytes on every machine with the same Pillow, and nothing is looked up on disk.
"""

from __future__ import annotations

import colorsys
import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CARD_SIZE = (610, 195)  # (width, height) in px
COVER_BOX = (15, 15, 215, 180)  # (x0, y0, x1, y1): the cover's 200x165 px region
COVER_SIZE = (COVER_BOX[2] - COVER_BOX[0], COVER_BOX[3] - COVER_BOX[1])  # (200, 165)

TITLE_X = 228
TITLE_Y = 18
TITLE_FONT_SIZE = 27
TITLE_LINE_HEIGHT = 34
TITLE_MAX_LINES = 3
TITLE_LINE_CHARS = 27
CATEGORY_FONT_SIZE = 19
ELLIPSIS = "..."

_TEXT_COLOUR = (20, 20, 20)
_CATEGORY_COLOUR = (110, 110, 110)
_BACKGROUND = (255, 255, 255)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def wrap_title(title: str, width: int = TITLE_LINE_CHARS, max_lines: int = TITLE_MAX_LINES) -> list[str]:
    """Greedy word wrap into at most `max_lines` lines of at most `width` characters.

    A word longer than a line is cut hard (as a card has no room to hyphenate). When the text
    does not fit, the last line ends with "..." and still respects `width`.
    """
    words = title.split()
    lines: list[str] = []
    current = ""
    i = 0
    while i < len(words):
        word = words[i]
        candidate = word if not current else f"{current} {word}"
        if len(candidate) <= width:
            current = candidate
            i += 1
            continue
        if not current:  # a single over-long word: cut it and keep the rest for the next line
            current, words[i] = word[:width], word[width:]
        lines.append(current)
        current = ""
        if len(lines) == max_lines:
            break
    else:
        if current:
            lines.append(current)
        return lines
    # Overflow: lines is full and words remain; mark the cut on the last line.
    last = lines[-1]
    if len(last) + len(ELLIPSIS) > width:
        last = last[: width - len(ELLIPSIS)].rstrip()
    lines[-1] = last + ELLIPSIS
    return lines


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, max_px: float) -> str:
    # The character budget assumes an average glyph width; wide glyphs (W, M, capitals) could
    # still run past the card's edge, so trim to the pixel budget too.
    if draw.textlength(text, font=font) <= max_px:
        return text
    while text and draw.textlength(text + ELLIPSIS, font=font) > max_px:
        text = text[:-1]
    return text.rstrip() + ELLIPSIS


def render_card(title: str, category: str, cover: Image.Image | None = None) -> Image.Image:
    """An RGB 610x195 impression card; the cover (any size, resized to 200x165) goes in COVER_BOX.

    Without a cover the box stays white: the IM-MIND way of showing a news that has no image.
    """
    card = Image.new("RGB", CARD_SIZE, _BACKGROUND)
    if cover is not None:
        cover = cover.convert("RGB")
        if cover.size != COVER_SIZE:
            cover = cover.resize(COVER_SIZE, Image.BICUBIC)
        card.paste(cover, COVER_BOX[:2])
    draw = ImageDraw.Draw(card)
    title_font = _font(TITLE_FONT_SIZE)
    max_px = CARD_SIZE[0] - TITLE_X - 8
    lines = wrap_title(title)
    y = TITLE_Y
    for line in lines:
        draw.text((TITLE_X, y), _fit(draw, line, title_font, max_px), fill=_TEXT_COLOUR, font=title_font)
        y += TITLE_LINE_HEIGHT
    # The category sits under the title block, never lower than the cover's bottom edge.
    cat_y = min(y + 8, COVER_BOX[3] - CATEGORY_FONT_SIZE)
    draw.text((TITLE_X, cat_y), _fit(draw, category, _font(CATEGORY_FONT_SIZE), max_px), fill=_CATEGORY_COLOUR, font=_font(CATEGORY_FONT_SIZE))
    return card


# ---------------------------------------------------------------------------------------
# Synthetic covers. The synthetic world (storage/synthetic.py) draws one cover per news
# that has an image: the background colour tells the topic (which the title also tells),
# the big shape tells the visual style (which nothing in the text tells). Position, size,
# rotation, ink colour and a few small distractor marks are jittered so that recognising
# the style takes a (small) learned vision model rather than a pixel lookup.

STYLE_NAMES = ("disc", "triangle", "stripes", "ring", "cross")


def topic_colour(topic: int) -> tuple[float, float, float]:
    """The topic's background colour as (hue, saturation, value) in [0, 1]."""
    # Golden-ratio hue steps keep neighbouring topic numbers far apart on the colour wheel.
    return ((topic * 0.618034) % 1.0, 0.35 + 0.2 * (topic % 3) / 2, 0.88)


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (round(r * 255), round(g * 255), round(b * 255))


def _rotate(points: list[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def draw_cover(topic: int, style: int, rng: np.random.Generator) -> Image.Image:
    """A 200x165 RGB cover: topic-coloured background, one big jittered shape of `style`."""
    w, h = COVER_SIZE
    hue, sat, val = topic_colour(topic)
    bg = _rgb(hue + rng.uniform(-0.02, 0.02), sat + rng.uniform(-0.08, 0.08), val + rng.uniform(-0.08, 0.06))
    img = Image.new("RGB", COVER_SIZE, bg)
    draw = ImageDraw.Draw(img)
    # Distractors: small marks in random colours, too small to be mistaken for the shape.
    for _ in range(int(rng.integers(3, 8))):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(2, 7)
        colour = _rgb(rng.uniform(0, 1), rng.uniform(0.2, 0.8), rng.uniform(0.3, 1.0))
        if rng.uniform() < 0.5:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        else:
            a = rng.uniform(0, math.pi)
            draw.line((x, y, x + 3 * r * math.cos(a), y + 3 * r * math.sin(a)), fill=colour, width=2)
    # Dark ink of any hue: contrast with the light background, colour carries no style.
    ink = _rgb(rng.uniform(0, 1), rng.uniform(0.5, 1.0), rng.uniform(0.12, 0.38))
    r = rng.uniform(32, 55)  # half the shape's extent: 64-110 px of a 165 px high cover
    cx, cy = rng.uniform(r + 4, w - r - 4), rng.uniform(r + 4, h - r - 4)
    angle = rng.uniform(-0.3, 0.3)
    name = STYLE_NAMES[style]
    if name == "disc":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=ink)
    elif name == "triangle":
        pts = [(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)]
        draw.polygon(_rotate(pts, cx, cy, angle), fill=ink)
    elif name == "stripes":
        n = int(rng.integers(3, 5))
        bar = 2 * r / (2 * n - 1)
        vertical = rng.uniform() < 0.5
        for i in range(n):
            a0 = -r + 2 * i * bar
            if vertical:
                pts = [(cx + a0, cy - r), (cx + a0 + bar, cy - r), (cx + a0 + bar, cy + r), (cx + a0, cy + r)]
            else:
                pts = [(cx - r, cy + a0), (cx + r, cy + a0), (cx + r, cy + a0 + bar), (cx - r, cy + a0 + bar)]
            draw.polygon(_rotate(pts, cx, cy, angle), fill=ink)
    elif name == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=ink, width=max(6, round(r / 3.2)))
    elif name == "cross":
        arm = r / 2.6
        bars = [
            [(cx - r, cy - arm / 2), (cx + r, cy - arm / 2), (cx + r, cy + arm / 2), (cx - r, cy + arm / 2)],
            [(cx - arm / 2, cy - r), (cx + arm / 2, cy - r), (cx + arm / 2, cy + r), (cx - arm / 2, cy + r)],
        ]
        turn = angle + (math.pi / 4 if rng.uniform() < 0.5 else 0.0)  # a plus or an x
        for pts in bars:
            draw.polygon(_rotate(pts, cx, cy, turn), fill=ink)
    else:
        raise ValueError(f"unknown visual style {style}; known: 0..{len(STYLE_NAMES) - 1} ({', '.join(STYLE_NAMES)})")
    return img
