"""The extractor registry: `NAME[:CHECKPOINT]` on the command line -> a built extractor.

One table of entries (the timm habit: the registry holds names and metadata, never the
models). An entry says what callers need to know without building anything: the feature
role its vectors play for the rankers (`text`, `image`, `blip`), its modality, the word for
its checkpoints in messages, its hub conventions and examples, and where its constructor
lives (`module:function`, imported on first `create`), so listing or validating names
imports neither torch nor any plug-in, and the plug-ins import nothing from here.
An unknown or duplicate name raises with the list of known names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from extractors.config import TINY

PRETRAINED = "pretrained"
"""The checkpoint keyword of a pretrainable extractor's tiny model pre-trained on the dataset."""
from storage.errors import PipelineError

ROLES = ("text", "image", "blip")
"""Feature roles: what a store's vectors stand for in a ranker (rankers.base re-exports them)."""


@dataclass(frozen=True)
class ExtractorEntry:
    """One registered extractor.

    `constructor` is `module:function`, called as `fn(checkpoint, **options)`. `kind` names
    its checkpoints in messages ("text checkpoint ..."); `hub_prefix` is prepended to a bare
    name when looking it up in the Hugging Face cache (timm keeps its models under `timm/`);
    `pretrainable` extractors also take the checkpoint `pretrained` (`PRETRAINED`): their tiny
    model pre-trained without labels on the dataset's own train news (runs.pretrain).
    """

    name: str
    role: str
    modality: str
    constructor: str
    kind: str
    hub_prefix: str = ""
    examples: tuple[str, ...] = ()
    pretrainable: bool = False  # `NAME:pretrained`: its tiny model pre-trained on the dataset (extractors.pretraining)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"extractor {self.name!r} declares role {self.role!r}; each must be one of {', '.join(ROLES)}")
        if ":" not in self.constructor:
            raise ValueError(f"extractor {self.name!r}: constructor {self.constructor!r} is not module:function")

    def build(self) -> Callable[..., Any]:
        module, _, function = self.constructor.partition(":")
        return getattr(importlib.import_module(module), function)


_REGISTRY: dict[str, ExtractorEntry] = {}


def register(entry: ExtractorEntry) -> ExtractorEntry:
    """Add an extractor entry; a duplicate name raises with the known names."""
    if entry.name in _REGISTRY:
        raise ValueError(f"extractor {entry.name!r} is registered twice; known: {', '.join(sorted(_REGISTRY))}")
    _REGISTRY[entry.name] = entry
    return entry


register(ExtractorEntry(
    "bert", role="text", modality="text", constructor="extractors.text:create_bert", kind="text",
    examples=("bert-base-uncased", "distilbert-base-uncased", "sentence-transformers/all-MiniLM-L6-v2"),
    pretrainable=True,
))
register(ExtractorEntry(
    "vit", role="image", modality="image", constructor="extractors.vit:create_vit", kind="vision",
    hub_prefix="timm/", examples=("vit_base_patch16_224", "google/vit-base-patch16-224"), pretrainable=True,
))
register(ExtractorEntry(
    "blip", role="blip", modality="multimodal", constructor="extractors.blip:create_blip", kind="BLIP",
    examples=("Salesforce/blip-itm-base-coco",), pretrainable=True,
))


def available() -> list[str]:
    return sorted(_REGISTRY)


def entry(name: str) -> ExtractorEntry:
    """The entry registered as `name`, or a PipelineError naming the known ones."""
    found = _REGISTRY.get(name.strip().lower())
    if found is None:
        raise PipelineError(f"unknown extractor {name!r}; known: {', '.join(available())}")
    return found


def role_of(name: str) -> str:
    """The feature role of extractor `name` (`bert` -> text)."""
    return entry(name).role


def extractor_for_role(role: str) -> str:
    """The first registered extractor that fills `role` (`image` -> vit): what to suggest."""
    for name in available():
        if _REGISTRY[name].role == role:
            return name
    raise PipelineError(f"no extractor fills the role {role!r}; known extractors: {', '.join(available())}")


def parse_spec(spec: str) -> tuple[str, str]:
    """`bert` -> (bert, tiny); `vit:vit_base_patch16_224` -> (vit, vit_base_patch16_224)."""
    name, _, checkpoint = spec.strip().partition(":")
    if not name:
        raise PipelineError(f"empty extractor in {spec!r}; expected NAME[:CHECKPOINT], NAME one of {', '.join(available())}")
    return name.lower(), checkpoint or TINY


def create(spec: str, **options: Any) -> Any:
    """Build the extractor named by `spec` (`NAME[:CHECKPOINT]`)."""
    name, checkpoint = parse_spec(spec)
    return entry(name).build()(checkpoint, **options)
