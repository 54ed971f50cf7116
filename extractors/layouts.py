"""Random-weight checkpoints in the on-disk layouts of public ones, for tests and benchmarks.

Nothing can be downloaded on these machines, yet the loaders must work on the real files. So
`write_checkpoint(repo, out)` writes what `hf download <repo>` would leave, file for file that
matters (config.json with its architectures, model.safetensors with the architecture's key
names, tokenizer files, preprocessor_config.json as the hub has it, sentence-transformers'
modules.json and 1_Pooling, timm's hub config), with seeded random weights. `size="tiny"`
shrinks every model to 2 layers of width 32 on 32-pixel images (tests); `size="base"` keeps
the public checkpoint's sizes (benchmarks: random weights cost what trained ones do).
`install_in_hub_cache` places such a folder in a Hugging Face cache as the hub client does
(blobs, snapshots/<revision> of relative links, refs/main).
Tokenizers are learned from the given titles (a WordPiece, byte-level BPE or Unigram
vocabulary in the checkpoint's own tokenizer class), so their ids fit the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from storage.errors import PipelineError

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
TINY_IMAGE, TINY_PATCH = 32, 8
_OPENAI = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
_HALF = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
_IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


@dataclass(frozen=True)
class Layout:
    """A public checkpoint's layout: which extractor takes it, what preflight should find
    (family, default pooling), and the writer of its files."""

    repo: str
    extractor: str
    family: str
    pooling: str
    write: Callable[[Path, str, Sequence[str]], None]


def _json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _save(model: torch.nn.Module, out: Path) -> None:
    from extractors.hf import quiet

    with quiet():
        model.save_pretrained(str(out))


def _words(titles: Sequence[str]) -> list[str]:
    counts = Counter(w for t in titles for w in str(t).lower().split())
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


# ---------------------------------------------------------------- tokenizers


def _wordpiece(out: Path, titles: Sequence[str]):
    from extractors.tokenizer import train_wordpiece

    tokenizer = train_wordpiece(titles, vocab_size=2000, out_dir=out)
    tokenizer.backend_tokenizer.model.save(str(out))  # vocab.txt, as BERT checkpoints ship it beside tokenizer.json
    return tokenizer


def _bpe(out: Path, titles: Sequence[str]):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([str(t) for t in titles], vocab_size=600, min_frequency=1, special_tokens=specials,
                            show_progress=False)
    model = json.loads(bpe._tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = RobertaTokenizer(vocab=model["vocab"], merges=merges)
    tokenizer.save_pretrained(str(out))
    bpe.save_model(str(out))  # vocab.json and merges.txt, as RoBERTa checkpoints ship them beside tokenizer.json
    return tokenizer


def _unigram(out: Path, titles: Sequence[str]):
    from transformers import DebertaV2Tokenizer

    chars = sorted({c for t in titles for c in str(t)} - {" "})
    pieces = [("[PAD]", 0.0), ("[UNK]", 0.0), ("[CLS]", 0.0), ("[SEP]", 0.0), ("[MASK]", 0.0)]
    pieces += [(f"\u2581{w}", -1.0 - i / 100) for i, w in enumerate(_words(titles)[:400])]
    pieces += [(c, -8.0) for c in chars] + [(f"\u2581{c}", -8.5) for c in chars] + [("\u2581", -9.0)]
    tokenizer = DebertaV2Tokenizer(vocab=pieces, unk_id=1, do_lower_case=False)
    tokenizer.save_pretrained(str(out))
    return tokenizer


# ---------------------------------------------------------------- text


def _text(model_cls: str, config_cls: str, tokenizer: Callable, base: dict, tiny_keys: dict | None = None):
    def write(out: Path, size: str, titles: Sequence[str]) -> None:
        import transformers

        tok = tokenizer(out, titles)
        dims = dict(base)
        if size == "tiny":
            dims.update(tiny_keys or TINY)
            dims["vocab_size"] = len(tok)
        dims["pad_token_id"] = tok.pad_token_id
        config = getattr(transformers, config_cls)(**dims)
        _save(getattr(transformers, model_cls)(config), out)

    return write


def _sentence(text_writer: Callable, modes: Sequence[str], normalize: bool, max_seq_length: int):
    """A sentence-transformers layout around a text checkpoint (as all-MiniLM-L6-v2's)."""

    def write(out: Path, size: str, titles: Sequence[str]) -> None:
        text_writer(out, size, titles)
        width = json.loads((out / "config.json").read_text())["hidden_size"]
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
        _json(out / "modules.json", modules)
        _json(out / "1_Pooling" / "config.json", {
            "word_embedding_dimension": width, "pooling_mode_cls_token": "cls" in modes,
            "pooling_mode_mean_tokens": "mean" in modes, "pooling_mode_max_tokens": "max" in modes,
            "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len" in modes})
        _json(out / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
        _json(out / "config_sentence_transformers.json", {"__version__": {"sentence_transformers": "2.2.2"}})

    return write


# ---------------------------------------------------------------- vision


def _vision_dims(size: str, hidden: int = 768, patch: int = 16, image: int = 224) -> dict:
    if size == "tiny":
        return dict(TINY, image_size=TINY_IMAGE, patch_size=TINY_PATCH)
    return dict(hidden_size=hidden, num_hidden_layers=12, num_attention_heads=hidden // 64,
                intermediate_size=4 * hidden, image_size=image, patch_size=patch)


def _side(size: str, base: int) -> int:
    return TINY_IMAGE if size == "tiny" else base


def _vit(out: Path, size: str, titles: Sequence[str]) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    _save(ViTForImageClassification(ViTConfig(num_labels=1000, **_vision_dims(size))), out)
    side = _side(size, 224)
    _json(out / "preprocessor_config.json", {  # as google/vit-base-patch16-224 has it
        "do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
        "image_mean": _HALF[0], "image_std": _HALF[1], "resample": 2, "size": side})


def _clip(out: Path, size: str, titles: Sequence[str]) -> None:
    from transformers import CLIPConfig, CLIPModel

    vision = _vision_dims(size, 768, 32, 224)
    text = dict(TINY, vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1) if size == "tiny" else {}
    _save(CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16 if size == "tiny" else 512)),
          out)
    side = _side(size, 224)
    _json(out / "preprocessor_config.json", {  # as openai/clip-vit-base-patch32 has it
        "crop_size": side, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": _OPENAI[0], "image_std": _OPENAI[1],
        "resample": 3, "size": side})


def _siglip(out: Path, size: str, titles: Sequence[str]) -> None:
    from transformers import SiglipConfig, SiglipModel

    text = dict(TINY, vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1) if size == "tiny" else {}
    _save(SiglipModel(SiglipConfig(text_config=text, vision_config=_vision_dims(size))), out)
    side = _side(size, 224)
    _json(out / "preprocessor_config.json", {  # as google/siglip-base-patch16-224 has it
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": _HALF[0],
        "image_processor_type": "SiglipImageProcessor", "image_std": _HALF[1], "processor_class": "SiglipProcessor",
        "resample": 3, "rescale_factor": 1 / 255, "size": {"height": side, "width": side}})


def _dinov2(out: Path, size: str, titles: Sequence[str]) -> None:
    from transformers import Dinov2Config, Dinov2Model

    dims = _vision_dims(size, 768, 14, 518)
    _save(Dinov2Model(Dinov2Config(**dims)), out)
    side = _side(size, 224)
    _json(out / "preprocessor_config.json", {  # as facebook/dinov2-base has it
        "crop_size": {"height": side, "width": side}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": _IMAGENET[0],
        "image_processor_type": "BitImageProcessor", "image_std": _IMAGENET[1], "resample": 3,
        "rescale_factor": 1 / 255, "size": {"shortest_edge": side * 8 // 7}})


def _timm(architecture: str):
    def write(out: Path, size: str, titles: Sequence[str]) -> None:
        import timm
        from timm.models import save_for_hf

        args = {}
        if size == "tiny":
            args = dict(depth=2, embed_dim=32, num_heads=2, img_size=TINY_IMAGE, patch_size=TINY_PATCH)
        model = timm.create_model(architecture, pretrained=False, **args)
        save_for_hf(model, str(out), safe_serialization=True)

    return write


def _blip(vision_hidden: int, vision_layers: int, preprocessor_size):
    def write(out: Path, size: str, titles: Sequence[str]) -> None:
        from transformers import BlipConfig, BlipForImageTextRetrieval

        tok = _wordpiece(out, titles)
        if size == "tiny":
            text = dict(TINY, vocab_size=len(tok) + 2, encoder_hidden_size=vision_hidden // 24)
            vision = dict(TINY, hidden_size=vision_hidden // 24, image_size=TINY_IMAGE, patch_size=TINY_PATCH)
            joint = 16
        else:
            text = dict(vocab_size=30524, encoder_hidden_size=vision_hidden)
            vision = dict(hidden_size=vision_hidden, num_hidden_layers=vision_layers,
                          num_attention_heads=vision_hidden // 64, intermediate_size=4 * vision_hidden,
                          image_size=384, patch_size=16)
            joint = 256
        text.update(pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id, bos_token_id=len(tok))
        config = BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=joint)
        _save(BlipForImageTextRetrieval(config), out)
        side = _side(size, 384)
        prep = {"do_normalize": True, "do_resize": True, "image_mean": _OPENAI[0], "image_std": _OPENAI[1],
                "image_processor_type": "BlipImageProcessor", "processor_class": "BlipProcessor"}
        prep["size"] = side if preprocessor_size == "int" else {"height": side, "width": side}
        if preprocessor_size != "int":
            prep.update(resample=3, rescale_factor=1 / 255, do_rescale=True)
        _json(out / "preprocessor_config.json", prep)

    return write


_BERT = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=30522)
_MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522)
_bert = _text("BertForMaskedLM", "BertConfig", _wordpiece, _BERT)
_minilm = _text("BertModel", "BertConfig", _wordpiece, _MINILM)

LAYOUTS = {layout.repo: layout for layout in (
    Layout("bert-base-uncased", "bert", "BERT", "cls", _bert),
    Layout("distilbert-base-uncased", "bert", "DistilBERT", "cls", _text(
        "DistilBertForMaskedLM", "DistilBertConfig", _wordpiece, dict(vocab_size=30522),
        dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64))),
    Layout("FacebookAI/roberta-base", "bert", "RoBERTa", "cls", _text(
        "RobertaForMaskedLM", "RobertaConfig", _bpe, dict(_BERT, vocab_size=50265, max_position_embeddings=514),
        dict(TINY, max_position_embeddings=66))),
    Layout("microsoft/deberta-v3-base", "bert", "DeBERTa-v2/v3", "cls", _text(
        "DebertaV2ForMaskedLM", "DebertaV2Config", _unigram, dict(_BERT, vocab_size=128100),
        dict(TINY, max_position_embeddings=64))),
    Layout("sentence-transformers/all-MiniLM-L6-v2", "bert", "BERT", "model",
           _sentence(_minilm, ("mean",), True, 256)),
    Layout("intfloat/e5-base-v2", "bert", "BERT", "model", _sentence(_minilm, ("mean",), True, 512)),
    Layout("BAAI/bge-base-en-v1.5", "bert", "BERT", "model", _sentence(_minilm, ("cls",), True, 512)),
    Layout("thenlper/gte-base", "bert", "BERT", "model", _sentence(_minilm, ("mean",), False, 512)),
    Layout("google/vit-base-patch16-224", "vit", "ViT", "cls", _vit),
    Layout("openai/clip-vit-base-patch32", "vit", "CLIP", "cls", _clip),
    Layout("google/siglip-base-patch16-224", "vit", "SigLIP", "model", _siglip),
    Layout("facebook/dinov2-base", "vit", "DINOv2", "cls", _dinov2),
    Layout("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", "vit", "timm", "cls", _timm("vit_base_patch16_224")),
    Layout("timm/vit_base_patch16_siglip_224.webli", "vit", "timm", "model", _timm("vit_base_patch16_siglip_224")),
    Layout("Salesforce/blip-itm-base-coco", "blip", "BLIP", "cls", _blip(768, 12, "int")),
    Layout("Salesforce/blip-itm-large-flickr", "blip", "BLIP", "cls", _blip(1024, 24, "dict")),
)}


def write_checkpoint(repo: str, out: str | Path, titles: Sequence[str], size: str = "tiny", seed: int = 0) -> Path:
    """Write `repo`'s layout with seeded random weights into the folder `out`; returns it."""
    layout = LAYOUTS.get(repo)
    if layout is None:
        raise PipelineError(f"no layout for {repo!r}; known: {', '.join(LAYOUTS)}")
    if size not in ("tiny", "base"):
        raise PipelineError(f"unknown checkpoint size {size!r}; known: tiny, base")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layout.write(out, size, [str(t) for t in titles])
    return out


def install_in_hub_cache(folder: str | Path, cache: str | Path, repo: str, revision: str | None = None) -> Path:
    """Place the checkpoint `folder` in the Hugging Face cache `cache` as `repo`, the way the
    hub client stores a download: content-addressed blobs, a snapshot folder of relative links
    and refs/main naming it. Returns the snapshot folder."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    digest = hashlib.sha1()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    revision = revision or digest.hexdigest()
    root = Path(cache) / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / revision
    for path in files:
        blob = root / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(revision, encoding="utf-8")
    return snapshot
