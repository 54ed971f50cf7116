"""The one frozen description of how an extractor turns news into vectors.

Preprocessing travels with the model: checkpoint, pooling, maximum length, image size,
mean/std, crop and the missing-image strategy live here, and the same object is written as
JSON into every feature store's attributes, so a store always says how it was made.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Literal

Modality = Literal["text", "image", "multimodal"]
Pooling = Literal["cls", "mean", "model"]
Crop = Literal["card", "cover"]
Missing = Literal["card", "blank", "zeros"]
Mode = Literal["frozen", "finetuned"]

TINY = "tiny"


def default_pooling(checkpoint: str, pooling: str | None) -> str:
    """The pooling asked for, else `mean` for `tiny` models and `cls` for pre-trained ones.

    A randomly initialised encoder's [CLS] has learned nothing to summarise: on the synthetic
    small world a linear probe finds a news' topic from tiny BERT's [CLS] for 18% of news and
    from its token mean for 73% (10% by chance), and every ranker over tiny features did as
    well or better with the mean. Pre-trained BERT, ViT and BLIP were trained to put the
    summary in [CLS]; a pre-trained checkpoint's default comes from its own files instead
    (extractors.checkpoints: sentence-transformers' pooling for MiniLM, E5 or GTE, SigLIP's
    head), so this rule only decides for `tiny`.
    """
    return pooling or ("mean" if checkpoint == TINY else "cls")


@dataclass(frozen=True)
class ExtractorConfig:
    """What an extractor is and how it preprocesses its input.

    `checkpoint` is `tiny` (a seeded random model built from a config, with a tokenizer
    trained on the dataset's titles), a Hugging Face / timm model name, or a local directory.
    `weights` is the identity of the weights (extractors.checkpoints.Checkpoint.identity: the
    hub revision of a cached snapshot, or the folder's resolved path and a digest of its files),
    `family` what they are (BERT, CLIP, timm...), `model_pooling` what `pooling="model"` means
    for them (e.g. `mean+normalize` for a sentence-transformers model).
    """

    name: str
    checkpoint: str = TINY
    modality: Modality = "text"
    revision: str | None = None
    pooling: Pooling = "cls"
    max_length: int = 32
    image_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    crop: Crop = "card"
    missing: Missing = "card"
    seed: int = 0
    weights: str = ""
    family: str = ""
    model_pooling: str = ""

    @property
    def is_tiny(self) -> bool:
        return self.checkpoint == TINY

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.checkpoint}"

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
