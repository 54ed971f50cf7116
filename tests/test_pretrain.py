"""Pre-training the tiny encoders: real checkpoint layouts, resume, cache, learning, no labels.

Every run here is a few optimiser steps on the tiny world; what pre-training buys on the
small world (probe accuracies, NRMS) is measured by benchmarks/pretrain.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from extractors.pretraining import default_config, pretrain, pretrain_digest
from extractors.pretraining.corpus import load_corpus
from extractors.registry import create
from storage.catalogue import load_catalogue
from storage.errors import PipelineError

# Long enough for bert and vit to show learning; blip's few steps only feed the layout,
# round-trip and resume tests (its learning is tested on one batch, below).
FAST = {
    "bert": dict(steps=48, batch_size=64, warmup_steps=5, checkpoint_every=16),
    "vit": dict(steps=36, batch_size=16, warmup_steps=3, checkpoint_every=12),
    "blip": dict(steps=12, batch_size=12, warmup_steps=2, checkpoint_every=4),
}
KILL_AT = {"bert": 20, "vit": 15, "blip": 6}  # one step past a checkpoint, two or more before the next


def fast(kind: str, **more):
    return default_config(kind, **{**FAST[kind], **more})


def _label_free_copy(world: Path, dest: Path) -> Path:
    """Only what pre-training may read: train/news.tsv and the cards. No behaviors (clicks),
    no hidden/ (topics, styles), no dev or test news."""
    (dest / "train").mkdir(parents=True)
    shutil.copy(world / "train" / "news.tsv", dest / "train" / "news.tsv")
    shutil.copytree(world / "images", dest / "images")
    return dest


def _in_memory(kind: str, world: Path, out: Path, text_init: Path | None = None):
    """Train through the library's own loop while keeping the objective (and its model)."""
    from extractors.pretraining import _identity, _objective
    from extractors.pretraining.loop import run

    corpus = load_corpus(world)
    config = fast(kind)
    objective = _objective(kind, corpus, config, 0, False, text_init)
    run(kind, objective, config, out, _identity(kind, corpus, config, 0, text_init), seed=0, progress=False)
    return objective


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_world) -> dict[str, tuple[Path, object]]:
    """kind -> (folder, objective) of one run of each kind (BLIP starting from that BERT),
    trained on a copy of the tiny world that holds no label at all."""
    root = tmp_path_factory.mktemp("pretrained")
    bare = _label_free_copy(tiny_world, root / "bare")
    out = {}
    for kind in ("bert", "vit", "blip"):
        init = out["bert"][0] if kind == "blip" else None
        out[kind] = (root / kind, _in_memory(kind, bare, root / kind, init))
    return out


@pytest.fixture(scope="module")
def folders(trained) -> dict[str, Path]:
    return {kind: folder for kind, (folder, _) in trained.items()}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# ----------------------------------------------------------------------------- layouts


def test_bert_folder_is_a_real_checkpoint_with_mean_pooling(folders, tiny_world):
    from transformers import AutoModel, AutoTokenizer

    folder = folders["bert"]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "modules.json",
            "sentence_bert_config.json", "1_Pooling", "pretrain.json"} <= names
    assert not [p for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] is True and pooling["pooling_mode_cls_token"] is False
    assert pooling["word_embedding_dimension"] == json.loads((folder / "config.json").read_text())["hidden_size"]
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling"]
    record = json.loads((folder / "pretrain.json").read_text())
    assert record["pooling"] == "mean" and record["load_with"] == "bert:DIR"
    assert len(record["losses"]) == FAST["bert"]["steps"]
    # AutoModel finds every weight it expects: nothing is initialised at load time.
    model, info = AutoModel.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info.values()), info
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer.convert_ids_to_tokens(tokenizer("senate vote")["input_ids"]) == ["[CLS]", "senate", "vote", "[SEP]"]


def test_vit_folder_is_a_timm_hub_checkpoint_with_its_preprocessing(folders):
    import timm

    folder = folders["vit"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["global_pool"] == "avg"
    assert config["model_args"]["img_size"] == [64, 192] and config["model_args"]["embed_dim"] == 64
    model = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0)
    data = timm.data.resolve_model_data_config(model)
    assert data["input_size"] == (3, 64, 192) and list(data["mean"]) == [0.5] * 3 and list(data["std"]) == [0.5] * 3
    assert model.global_pool == "avg"
    extractor = create(f"vit:{folder}", pooling="mean")
    assert extractor.config.image_size == (64, 192) and extractor.config.mean == (0.5, 0.5, 0.5)
    assert extractor.config.interpolation == "bicubic"


def test_blip_folder_loads_with_its_processor(folders):
    folder = folders["blip"]
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    extractor = create(f"blip:{folder}")
    assert extractor.config.image_size == (64, 64) and extractor.config.pooling == "cls"
    assert extractor.config.mean == (0.5, 0.5, 0.5) and extractor.config.std == (0.5, 0.5, 0.5)
    record = json.loads((folder / "pretrain.json").read_text())
    assert record["identity"]["text_init"] == json.loads((folders["bert"] / "pretrain.json").read_text())["identity"]


# ----------------------------------------------------------------------------- round trips


def test_saved_models_give_the_in_memory_vectors(trained, tiny_world):
    from extractors.blip import BlipExtractor
    from extractors.config import ExtractorConfig
    from extractors.images import CardDataset, ImageTransform

    cat = load_catalogue(tiny_world)
    titles = [str(t) for t in cat.title[:20]]
    rows = sorted(cat.images)[:6]
    paths = [cat.image_dir / f"{n}.jpg" for n in rows]

    folder, bert = trained["bert"]
    loaded = create(f"bert:{folder}", pooling="mean")
    batch = loaded.tokenize(titles)
    assert torch.equal(batch["input_ids"], bert.tokenizer(titles, padding=True, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        hidden = bert.model.bert(**batch).last_hidden_state  # (B, L, D)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expect = (hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(loaded.encode(titles).vectors, expect, rtol=0, atol=1e-5)

    folder, vit = trained["vit"]
    loaded = create(f"vit:{folder}", pooling="mean")
    pixels = torch.stack([CardDataset(paths, titles, titles, loaded.transform)[i][0] for i in range(len(paths))])
    with torch.no_grad():
        expect = vit.model.encoder.forward_features(pixels).mean(1)
    torch.testing.assert_close(loaded.encode(pixels).vectors, expect, rtol=0, atol=1e-5)
    # The training path (patches times the conv weight) is timm's own patch embedding.
    x = torch.randn(2, 3, 64, 192)
    conv = vit.model.encoder.patch_embed.proj
    torch.testing.assert_close(vit.patchify(x) @ conv.weight.flatten(1).T + conv.bias, vit.model.encoder.patch_embed(x))

    folder, blip = trained["blip"]
    loaded = create(f"blip:{folder}")
    transform = ImageTransform(size=(64, 64), mean=(0.5,) * 3, std=(0.5,) * 3)
    pixels = torch.stack([CardDataset(paths, titles, titles, transform)[i][0] for i in range(len(paths))])
    memory = BlipExtractor(ExtractorConfig(name="blip", modality="multimodal", image_size=(64, 64)), blip.model, blip.tokenizer)
    got, want = loaded.encode(titles[:6], pixels), memory.encode(titles[:6], pixels)
    torch.testing.assert_close(got.vectors, want.vectors, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.extras["image_embeds"], want.extras["image_embeds"], rtol=0, atol=1e-5)


def test_blip_text_encoder_starts_as_the_bert(folders, tiny_world):
    from transformers import AutoModel

    from extractors.blip import build_tiny_blip
    from extractors.pretraining.blip import load_text_encoder

    bert = AutoModel.from_pretrained(str(folders["bert"])).eval()
    blip = build_tiny_blip(bert.config.vocab_size, bert.config.pad_token_id, 32, seed=3).eval()
    load_text_encoder(blip, folders["bert"])
    ids = torch.tensor([[2, 7, 9, 11, 3, 0]])
    att = (ids != 0).long()
    with torch.no_grad():
        torch.testing.assert_close(
            blip.text_encoder(input_ids=ids, attention_mask=att).last_hidden_state,
            bert(input_ids=ids, attention_mask=att).last_hidden_state, rtol=0, atol=1e-5,
        )


# ----------------------------------------------------------------------------- resume, cache, identity


class _Killed(Exception):
    pass


@pytest.mark.parametrize("kind", ["bert", "vit", "blip"])
def test_resume_after_a_kill_is_bit_identical_and_reads_no_label(kind, tmp_path, tiny_world, folders):
    """Killed mid-run, rerun: the same weights and losses, to the bit, as the fixture's
    uninterrupted run, which read a copy of the world without clicks, topics or styles."""
    init = folders["bert"] if kind == "blip" else None
    config, kill = fast(kind), KILL_AT[kind]
    checkpoint = kill - kill % config.checkpoint_every

    def killer(step: int, loss: float) -> None:
        if step == kill:
            raise _Killed

    out = tmp_path / "resumed"
    with pytest.raises(_Killed):
        pretrain(kind, tiny_world, out, config=config, text_init=init, progress=False, on_step=killer)
    assert not out.exists() and (tmp_path / "resumed.partial" / "state.safetensors").is_file()
    seen = []
    pretrain(kind, tiny_world, out, config=config, text_init=init, progress=False, on_step=lambda s, _: seen.append(s))
    assert seen == list(range(checkpoint + 1, config.steps + 1))
    assert not (tmp_path / "resumed.partial").exists()
    record = json.loads((out / "pretrain.json").read_text())
    assert record["resumed_from_step"] == checkpoint
    straight = folders[kind]
    assert record["identity"] == json.loads((straight / "pretrain.json").read_text())["identity"]
    a, b = _tensors(out), _tensors(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert record["losses"] == json.loads((straight / "pretrain.json").read_text())["losses"]


def test_rerun_reuses_the_folder_and_other_runs_are_refused(folders, tiny_world, tmp_path):
    folder = folders["bert"]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    steps = []
    assert pretrain("bert", tiny_world, folder, config=fast("bert"), progress=False, on_step=lambda s, _: steps.append(s)) == folder
    assert steps == [] and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    # The digest names what a run reads: the fixture's label-free copy and the full world agree.
    digest = pretrain_digest("bert", tiny_world, config=fast("bert"))
    assert digest == pretrain_digest("bert", folder.parent / "bare", config=fast("bert"))
    assert len(digest) == 12 and digest != pretrain_digest("bert", tiny_world, config=fast("bert"), seed=1)
    assert digest != pretrain_digest("vit", tiny_world, config=fast("vit"))
    with pytest.raises(PipelineError, match="another run.*steps"):
        pretrain("bert", tiny_world, folder, config=fast("bert", steps=13), progress=False)
    with pytest.raises(PipelineError, match="another run.*seed"):
        pretrain("bert", tiny_world, folder, config=fast("bert"), seed=1, progress=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="no pretrain.json"):
        pretrain("bert", tiny_world, tmp_path / "taken", config=fast("bert"), progress=False)
    with pytest.raises(PipelineError, match="unknown pre-training kind"):
        pretrain("gpt", tiny_world, tmp_path / "x")
    with pytest.raises(PipelineError, match="text_init is for blip"):
        pretrain("vit", tiny_world, tmp_path / "x", text_init=folder)
    with pytest.raises(PipelineError, match="not a finished pre-trained tiny BERT"):
        pretrain("blip", tiny_world, tmp_path / "x", text_init=folders["vit"])
    with pytest.raises(PipelineError, match="train/news.tsv"):
        pretrain("bert", tmp_path / "taken", tmp_path / "x")
    with pytest.raises(PipelineError, match="unknown pre-training option"):
        default_config("bert", mask_ratio=0.5)
    with pytest.raises(PipelineError, match="steps=0"):
        default_config("vit", steps=0)
    assert not (tmp_path / "x").exists()


def test_the_callers_rng_and_threads_are_left_alone(tiny_world, tmp_path):
    torch.manual_seed(1234)
    threads = torch.get_num_threads()
    before = torch.random.get_rng_state()
    pretrain("vit", tiny_world, tmp_path / "v", config=fast("vit", steps=3), threads=2, progress=False)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.get_num_threads() == threads


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_the_loss_decreases(kind, folders):
    # BERT starts at log(vocabulary) ~ 6.2 nats and first learns the word frequencies (~5.9);
    # MAE's per-patch normalised targets start at about 0.7 (1.0 is predicting the patch mean).
    losses = np.array(json.loads((folders[kind] / "pretrain.json").read_text())["losses"])
    assert np.isfinite(losses).all()
    first, last = losses[:8].mean(), losses[-8:].mean()
    assert last < first * {"bert": 0.96, "vit": 0.85}[kind], (first, last)


def test_blip_objective_learns_a_batch(trained):
    """ITC + ITM fit one fixed batch. Real pre-training needs a couple of hundred steps to leave
    chance level (a post-LN encoder's [CLS] barely depends on its input at first), more than a
    test can spend: the small world's run is in benchmarks/pretrain.py."""
    _, objective = trained["blip"]
    model, config = objective.model, objective.config
    state = {k: v.clone() for k, v in model.state_dict().items()}
    objective.config = dataclasses.replace(config, batch_size=4)
    model.requires_grad_(True)  # a frozen extractor may have been wrapped around it
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for _ in range(150):  # until it has learned the batch: how soon depends on the start
                loss = objective.loss(torch.Generator().manual_seed(0))  # the same batch and negatives
                opt.zero_grad()
                loss.backward()
                if not losses:
                    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
                    # Every part trains: vision, text, cross-attention, projections, ITM head.
                    assert not silent, silent
                opt.step()
                losses.append(float(loss.detach()))
                if len(losses) >= 10 and np.mean(losses[-5:]) < 0.92 * np.mean(losses[:5]):
                    break
    finally:
        objective.config = config
        model.load_state_dict(state)
        model.eval()
    assert np.mean(losses[-5:]) < 0.92 * np.mean(losses[:5]), losses
