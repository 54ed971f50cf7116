"""Self-supervised pre-training of the tiny encoders: the embedded analogue of BERT and ViT.

On real data users bring encoders pre-trained on huge corpora; the embedded world's tiny
models start from random weights, which makes their text arm a strawman. `pretrain` gives
them the same kind of start, on the dataset's own train news and with no click, topic or
style ever read:

- `bert`: masked-language modelling on the train split's titles and abstracts;
- `vit`: masked-patch reconstruction (MAE) on the train news' cards;
- `blip`: image-text contrastive (ITC) and matching (ITM) losses on (card, title) pairs.

Each result is a local checkpoint folder in the layout of a real one, loaded by the usual
extractors: `extractors.registry.create("bert:" + str(folder))`, `vit:DIR`, `blip:DIR`. See
docs/pretraining.md for objectives, budgets, measured probe figures and the layout.

    from extractors.pretraining import pretrain, pretrain_digest
    folder = pretrain("bert", "storage/data/synthetic-small-seed0", "storage/models/pretrained/x__bert-abc")

Letters: B batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch

from extractors.pretraining.loop import FORMAT_VERSION, PretrainConfig, check_out, read_record, run
from storage.errors import PipelineError

KINDS = ("bert", "vit", "blip")


def default_config(kind: str, **overrides) -> PretrainConfig:
    """The kind's default config (its objective's dataclass), with `overrides` replaced."""
    cls = _config_class(kind)
    try:
        config = replace(cls(), **overrides)
    except TypeError as err:
        raise PipelineError(f"unknown pre-training option for {kind}: {err}; known: {', '.join(asdict(cls()))}") from None
    config.check()
    return config


def _config_class(kind: str) -> type[PretrainConfig]:
    if kind == "bert":
        from extractors.pretraining.bert import BertPretrainConfig

        return BertPretrainConfig
    if kind == "vit":
        from extractors.pretraining.vit import VitPretrainConfig

        return VitPretrainConfig
    if kind == "blip":
        from extractors.pretraining.blip import BlipPretrainConfig

        return BlipPretrainConfig
    raise PipelineError(f"unknown pre-training kind {kind!r}; known: {', '.join(KINDS)}")


def _objective(kind: str, corpus, config: PretrainConfig, seed: int, progress: bool, text_init: Path | None):
    if kind == "bert":
        from extractors.pretraining.bert import MaskedLanguageModel

        return MaskedLanguageModel(corpus, config, seed)
    if kind == "vit":
        from extractors.pretraining.vit import MaskedAutoencoder

        return MaskedAutoencoder(corpus, config, seed, progress)
    from extractors.pretraining.blip import ImageTextMatching

    return ImageTextMatching(corpus, config, seed, progress, text_init)


def _identity(kind: str, corpus, config: PretrainConfig, seed: int, text_init: Path | None = None) -> dict:
    identity = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "seed": seed,
        "config": asdict(config),
        "data": corpus.digest(images=kind != "bert"),
    }
    if text_init is not None:
        identity["text_init"] = _text_init_identity(text_init)
    return identity


def _text_init(kind: str, text_init: str | os.PathLike[str] | None) -> Path | None:
    """The pre-trained BERT folder BLIP's text encoder starts from, checked."""
    if text_init is None:
        return None
    if kind != "blip":
        raise PipelineError(f"text_init is for blip (its text encoder starts from a pre-trained BERT), not {kind}")
    folder = Path(text_init).expanduser().resolve()
    record = read_record(folder)
    if record is None or record.get("kind") != "bert":
        raise PipelineError(
            f"{folder} is not a finished pre-trained tiny BERT (no pretrain.json of kind bert); "
            "run pretrain('bert', ...) first and pass its folder"
        )
    return folder


def _text_init_identity(folder: Path) -> dict:
    record = read_record(folder) or {}
    return record.get("identity", {})


def pretrain_digest(
    kind: str,
    data_dir: str | os.PathLike[str],
    *,
    images_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    config: PretrainConfig | None = None,
    text_init: str | os.PathLike[str] | None = None,
) -> str:
    """12 hex digits naming a run (kind, config, seed, the data it reads): for a folder name
    such as `<storage>/models/pretrained/<dataset>__<kind>-<digest>`."""
    import hashlib
    import json

    from extractors.pretraining.corpus import load_corpus

    corpus = load_corpus(data_dir, images_dir)
    config = (config or default_config(kind)).sized(len(corpus.ids))
    identity = _identity(kind, corpus, config, seed, _text_init(kind, text_init))
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def pretrain(
    kind: str,
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    images_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    config: PretrainConfig | None = None,
    steps: int | None = None,
    text_init: str | os.PathLike[str] | None = None,
    threads: int | None = 1,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """Pre-train the tiny `kind` encoder (bert, vit, blip) on the train split of `data_dir`
    and return `out_dir`, a checkpoint folder loadable as `KIND:out_dir`.

    `config` defaults to `default_config(kind)`; `steps` overrides its budget. `out_dir`
    holding this very run (same kind, config, seed and data) is returned as is; holding
    anything else it is refused. `text_init` (blip only): a pre-trained tiny BERT folder of the
    same data that BLIP's text encoder starts from, as BLIP starts from BERT-base (its
    identity joins the run's). A killed run resumes from its last checkpoint in
    `<out_dir>.partial/`. `threads` sets torch's intra-op threads for the run only (one is
    fastest for these tiny models on shared cores; None keeps the caller's). `on_step(step,
    loss)` is called after every optimiser step.
    """
    from extractors.pretraining.corpus import load_corpus

    if kind not in KINDS:
        raise PipelineError(f"unknown pre-training kind {kind!r}; known: {', '.join(KINDS)}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise PipelineError(f"seed must be a non-negative integer, got {seed!r}")
    config = config or default_config(kind)
    if not isinstance(config, _config_class(kind)):
        raise PipelineError(f"config for {kind} must be a {_config_class(kind).__name__}, got {type(config).__name__}")
    out = Path(out_dir).expanduser().resolve()
    corpus = load_corpus(data_dir, images_dir)
    config = replace(config, steps=int(steps), epochs=0.0) if steps is not None else config.sized(len(corpus.ids))
    config.check()
    init = _text_init(kind, text_init)
    identity = _identity(kind, corpus, config, seed, init)
    if check_out(out, identity):
        return out  # cached: nothing to build
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        objective = _objective(kind, corpus, config, seed, progress, init)
        return run(kind, objective, config, out, identity, seed=seed, progress=progress, on_step=on_step)
    finally:
        torch.set_num_threads(before)


__all__ = ["KINDS", "PretrainConfig", "default_config", "pretrain", "pretrain_digest"]
