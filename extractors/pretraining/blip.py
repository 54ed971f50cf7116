"""Image-text contrastive and matching losses (ITC + ITM) for the tiny BLIP, on (card, title) pairs.

BLIP's two retrieval objectives at a tiny scale, on the train news' cards (64x64, the tiny
BLIP's input; title-only cards for news without a cover) and titles, with the architecture
of extractors.blip (`build_tiny_blip`):

- ITC: the card's [CLS] (vision_proj) and the title's [CLS] (text_proj, the text encoder
  without the image) are L2-normalised; a batch's B x B similarities over a fixed
  temperature are a classification of each card's title among the batch's titles and back
  (symmetric cross-entropy, as CLIP and BLIP).
- ITM: the text encoder cross-attending to the card says whether the pair belongs together
  (`itm_head` on its [CLS]): the B true pairs against B + B hard negatives, for each card a
  title and for each title a card drawn in proportion to their ITC similarity (the
  diagonal excluded), as BLIP mines them.

No click, no topic, no style: only which title goes with which card. ITM trains the
multimodal [CLS], which is what BLIP's extractor vector pools under `cls` (the default for
a named checkpoint). Saved in Hugging Face's layout (`config.json`, `model.safetensors`, a
`BlipProcessor`: `preprocessor_config.json` with the 64x64 size, mean and std 0.5, and the
tokenizer files), loadable by `BlipForImageTextRetrieval` / `BlipProcessor` and so by `blip:DIR`.
Letters: B batch, L tokens, P image tokens, D width, E projection width.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from extractors.blip import TINY_BLIP_IMAGE, build_tiny_blip
from extractors.pretraining.bert import length_batch
from extractors.pretraining.corpus import Corpus, card_pixels
from extractors.pretraining.loop import PretrainConfig, require
from extractors.tokenizer import train_wordpiece
from storage.errors import PipelineError

MEAN = STD = (0.5, 0.5, 0.5)
SIDE = TINY_BLIP_IMAGE[0]  # the tiny BLIP sees the card squeezed to SIDE x SIDE, as its extractor


@dataclass(frozen=True)
class BlipPretrainConfig(PretrainConfig):
    steps: int = 250
    batch_size: int = 64
    epochs: float = 8.0  # the small world: the 250 steps; the tiny world: 33
    lr: float = 2e-3
    warmup_steps: int = 25
    temperature: float = 0.07
    itm_weight: float = 1.0
    max_length: int = 32  # titles, as the extractor tokenises them
    vocab_size: int = 4000

    def check(self) -> None:
        super().check()
        require(self, self.temperature > 0 and self.itm_weight >= 0 and self.max_length >= 8,
                 "temperature > 0, itm_weight >= 0, max_length >= 8")


class ImageTextMatching:
    """ITC + ITM over (card, title) pairs; `model` is a `BlipForImageTextRetrieval`."""

    def __init__(
        self, corpus: Corpus, config: BlipPretrainConfig, seed: int, progress: bool = False, text_init: Path | None = None
    ):
        self.config = config
        self.text_init = text_init
        if text_init is None:
            # The BERT objective's vocabulary (titles and abstracts): the same words, the same ids.
            self.tokenizer = train_wordpiece(corpus.texts(), vocab_size=config.vocab_size)
        else:
            from extractors.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(text_init)
        self.tokenizer.model_max_length = config.max_length
        titles = [str(t) for t in corpus.title]
        encoded = self.tokenizer(titles, truncation=True, max_length=config.max_length)["input_ids"]
        self.sequences = [torch.tensor(ids, dtype=torch.long) for ids in encoded]
        self.lengths = torch.tensor([len(s) for s in self.sequences])  # (N,)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.pixels = card_pixels(corpus, (SIDE, SIDE), progress)  # (N, 3, SIDE, SIDE) uint8
        self.covers = sum(p is not None for p in corpus.image_paths)
        self.model = build_tiny_blip(len(self.tokenizer), self.pad_id, config.max_length, seed)
        init_vision(self.model, seed)
        if text_init is not None:
            load_text_encoder(self.model, text_init)
        self.mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(STD).view(1, 3, 1, 1)

    def loss(self, generator: torch.Generator) -> torch.Tensor:
        cfg, m = self.config, self.model
        rows = length_batch(self.lengths, cfg.batch_size, generator)
        width = int(self.lengths[rows].max())
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, L)
        for r, i in enumerate(rows):
            ids[r, : len(self.sequences[i])] = self.sequences[i]
        attention = (ids != self.pad_id).long()  # (B, L)
        pixels = (self.pixels[rows].float() / 255.0 - self.mean) / self.std  # (B, 3, S, S)
        b = len(rows)

        image = m.vision_model(pixel_values=pixels).last_hidden_state  # (B, P, D)
        text = m.text_encoder(input_ids=ids, attention_mask=attention).last_hidden_state  # (B, L, D)
        image_feat = nn.functional.normalize(m.vision_proj(image[:, 0]), dim=-1)  # (B, E)
        text_feat = nn.functional.normalize(m.text_proj(text[:, 0]), dim=-1)  # (B, E)
        sim = image_feat @ text_feat.T / cfg.temperature  # (B, B) card i vs title j
        target = torch.arange(b)
        itc = (nn.functional.cross_entropy(sim, target) + nn.functional.cross_entropy(sim.T, target)) / 2

        with torch.no_grad():
            # A title that appears twice in the batch is no negative of itself (the diagonal included).
            same = (ids.unsqueeze(1) == ids.unsqueeze(0)).all(-1)  # (B, B)
            w_i2t = torch.softmax(sim.float(), dim=1).masked_fill(same, 0) + 1e-9 * ~same
            w_t2i = torch.softmax(sim.T.float(), dim=1).masked_fill(same, 0) + 1e-9 * ~same
            neg_text = torch.multinomial(w_i2t, 1, generator=generator)[:, 0]  # (B,) a title for each card
            neg_image = torch.multinomial(w_t2i, 1, generator=generator)[:, 0]  # (B,) a card for each title
        pair_ids = torch.cat([ids, ids, ids[neg_text]])  # (3B, L): true, title+wrong card, wrong title+card
        pair_att = torch.cat([attention, attention, attention[neg_text]])
        pair_img = torch.cat([image, image[neg_image], image])  # (3B, P, D)
        grounded = m.text_encoder(
            input_ids=pair_ids, attention_mask=pair_att, encoder_hidden_states=pair_img,
            encoder_attention_mask=torch.ones(pair_img.shape[:2], dtype=torch.long),
        ).last_hidden_state  # (3B, L, D)
        logits = m.itm_head(grounded[:, 0])  # (3B, 2)
        labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)])
        itm = nn.functional.cross_entropy(logits, labels)
        return itc + cfg.itm_weight * itm

    def save(self, folder: Path) -> None:
        from PIL import Image
        from transformers import BlipImageProcessor, BlipProcessor

        self.model.eval().save_pretrained(str(folder))
        images = BlipImageProcessor(
            size={"height": SIDE, "width": SIDE}, resample=Image.BICUBIC, image_mean=list(MEAN), image_std=list(STD),
            do_convert_rgb=True,
        )
        BlipProcessor(image_processor=images, tokenizer=self.tokenizer).save_pretrained(str(folder))
        # transformers 5 nests the image settings in processor_config.json; published BLIP
        # checkpoints (and older transformers) read preprocessor_config.json: write both.
        images.save_pretrained(str(folder))

    def card(self) -> dict[str, Any]:
        return {
            "load_with": "blip:DIR",
            "text_init": "the pre-trained tiny BERT (pretrain.json's text_init_identity)" if self.text_init else "random",
            "pooling": "cls",
            "objective": "image-text contrastive (ITC, temperature "
                         f"{self.config.temperature}) + image-text matching with hard negatives (ITM) on the "
                         "train news' (card, title) pairs",
            "pairs": len(self.sequences),
            "cards_with_cover": self.covers,
            "image_size": [SIDE, SIDE],
            "crop": "card",
        }


def load_text_encoder(model: nn.Module, bert_dir: Path) -> None:
    """Start BLIP's text encoder from a pre-trained BERT of the same sizes, as BLIP starts from
    BERT-base: every self-attention, feed-forward and embedding weight is copied; the
    cross-attention layers (ITM's) keep their initial weights. BLIP's text embeddings have no
    token types, so BERT's type-0 embedding (added to every token) joins the position
    embeddings: the unimodal encoder then computes exactly what the BERT computes."""
    from safetensors.torch import load_file

    bert = load_file(str(bert_dir / "model.safetensors"))
    bert = {k.removeprefix("bert."): v for k, v in bert.items()}
    target = model.text_encoder.state_dict()
    copied = {k: v for k, v in bert.items() if k in target}
    type0 = bert.get("embeddings.token_type_embeddings.weight")
    if type0 is not None:
        copied["embeddings.position_embeddings.weight"] = copied["embeddings.position_embeddings.weight"] + type0[0]
    shapes = [k for k, v in copied.items() if v.shape != target[k].shape]
    left = [k for k in target if k not in copied and ".crossattention." not in k]
    if shapes or left:
        raise PipelineError(
            f"{bert_dir}: this BERT does not fit the tiny BLIP's text encoder (other shapes: {shapes[:3]}; "
            f"missing: {left[:3]}); pre-train BLIP without text_init or with the tiny BERT of the same data"
        )
    model.text_encoder.load_state_dict(copied, strict=False)


def init_vision(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Give BLIP's vision tower a ViT's initialisation (truncated normal, std 0.02).

    transformers' BlipVisionConfig defaults to initializer_range 1e-10, meant for towers that
    are then loaded from a pre-trained ViT: left as built, every card gives the same image
    embedding (their pairwise cosine is 1.0), and ITC sat at chance for hundreds of steps.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7)
        for module in model.vision_model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        embeddings = model.vision_model.embeddings
        nn.init.trunc_normal_(embeddings.class_embedding, std=std)
        nn.init.trunc_normal_(embeddings.position_embedding, std=std)
