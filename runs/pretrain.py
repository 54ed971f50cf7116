"""Pre-trained tiny encoders as checkpoints: `bert:pretrained`, `vit:pretrained`, `blip:pretrained`.

The checkpoint keyword `pretrained` (extractors.registry.PRETRAINED) names an extractor's tiny
model pre-trained without any click, topic or style on the dataset's own train news
(extractors.pretraining: masked-language modelling for BERT, masked-patch reconstruction for
the ViT, image-text contrastive and matching losses for BLIP, whose text encoder starts from
the pre-trained BERT). It lives in `<storage>/models/pretrained/<dataset>__<kind>-<digest>/`, a
checkpoint folder in the layout of a real one, so it is then an ordinary `NAME:DIR` checkpoint:
`resolve_spec` turns the keyword into that folder, and stores, run records and caches key on
the folder like on any local checkpoint. The digest covers the kind, its config, the seed and
the data it reads, so other data or settings pre-train again; the same ones reuse the folder,
and a killed pre-training resumes (extractors.pretraining).

`ensure_pretrained` pre-trains what is missing (BERT before BLIP); the flows call it as a task
before extracting, and `python -m flows.pretrain` calls it alone.
"""

from __future__ import annotations

from pathlib import Path

from extractors.registry import PRETRAINED, entry, parse_spec
from storage.errors import PipelineError
from storage.paths import safe_name, storage_path

TEXT_INIT = {"blip": "bert"}  # kind -> the kind whose pre-trained folder it starts from


def is_pretrained(spec: str) -> bool:
    return parse_spec(spec)[1] == PRETRAINED


def check_pretrainable(name: str) -> None:
    if not entry(name).pretrainable:
        pretrainable = [n for n in ("bert", "vit", "blip") if entry(n).pretrainable]
        raise PipelineError(f"{name}:{PRETRAINED}: only {', '.join(pretrainable)} have a pre-trained tiny model; "
                            f"give {name} a checkpoint (a folder or a hub name)")


def folder_of(kind: str, data: Path, images: Path | None, storage) -> Path | None:
    """The folder of `kind`'s pre-trained model for this data (None: BLIP's BERT is not there yet)."""
    from extractors.pretraining import pretrain_digest

    init = None
    if kind in TEXT_INIT:
        init = folder_of(TEXT_INIT[kind], data, images, storage)
        if init is None or not init.is_dir():
            return None
    digest = pretrain_digest(kind, data, images_dir=images, text_init=init)
    name = safe_name(f"{Path(data).name}__{kind}-{digest}")
    return storage_path("models", "pretrained", name, storage=storage)


def ensure_pretrained(kind: str, data: Path, images: Path | None, storage, progress: bool = True) -> Path:
    """`kind`'s pre-trained folder for this data, pre-trained (or resumed) when missing."""
    from extractors.pretraining import pretrain

    check_pretrainable(kind)
    init = ensure_pretrained(TEXT_INIT[kind], data, images, storage, progress) if kind in TEXT_INIT else None
    out = folder_of(kind, data, images, storage)
    out.parent.mkdir(parents=True, exist_ok=True)
    return pretrain(kind, data, out, images_dir=images, text_init=init, progress=progress)


def resolve_spec(spec: str, data: Path, images: Path | None, storage) -> str:
    """`NAME:pretrained` -> `NAME:<its folder>`; any other spec as it is. The folder must exist
    (`ensure_pretrained`, which the flows run first)."""
    name, checkpoint = parse_spec(spec)
    if checkpoint != PRETRAINED:
        return spec
    check_pretrainable(name)
    folder = folder_of(name, data, images, storage)
    if folder is None or not folder.is_dir():
        raise PipelineError(f"{name}:{PRETRAINED} for {Path(data).name} is not pre-trained yet; run python -m "
                            f"flows.pretrain --data {data} (the flows do it before extracting)")
    return f"{name}:{folder}"


def kinds_needed(specs) -> list[str]:
    """The kinds to pre-train for these specs, in the order they can be trained."""
    wanted = {parse_spec(s)[0] for s in specs if is_pretrained(s)}
    wanted |= {TEXT_INIT[k] for k in wanted if k in TEXT_INIT}
    return [k for k in ("bert", "vit", "blip") if k in wanted]
