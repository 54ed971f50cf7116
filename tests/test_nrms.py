"""The NRMS ranker: fusion contract, masking, per-user independence, batch dedup, encode-once
scoring, negative sampling, save/load, and learning on the tiny synthetic world."""

from __future__ import annotations

import dataclasses
import inspect
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankers.attention import AdditiveAttention, Dropout, MaskedSelfAttention, keep_mask
from rankers.base import ROLES, FitReport
from rankers.data import Impressions, NewsFeatures, carve_validation, load_features, load_impressions
from rankers.fusion import FEATURE_ROLES, Layer, available, label_of, register, roles_of
from rankers.fusion_module import create_fusion
from storage.errors import PipelineError
from rankers.metrics import evaluate
from rankers.nrms import NRMS, NRMSConfig
from rankers.early_stopping import EarlyStopping
from rankers.train import (
    NewsBank, NRMSRanker, batch_tensors, build_samples, distinct_users, forward_batch, impression_order,
    score_impressions, train_loss,
)

SMALL = NRMSConfig(dim=16, heads=4, additive_hidden=16, dropout=0.2, history=6, batch_size=16, epochs=1)



# ------------------------------------------------------------------------------------------
# Synthetic arrays


def random_features(n: int = 40, dim: int = 8, length: int = 7, seed: int = 0) -> dict[str, NewsFeatures]:
    """Every role, with token vectors whose masks have varied lengths (one row fully masked)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, role in enumerate(ROLES):
        lengths = rng.integers(1, length + 1, n)
        lengths[3] = 0  # a news with no token at all (e.g. a missing image stored with an empty mask)
        mask = np.arange(length)[None, :] < lengths[:, None]
        tokens = rng.normal(size=(n, length, dim + k)).astype(np.float32)
        tokens[~mask] = 0.0
        out[role] = NewsFeatures(role, "text", rng.normal(size=(n, dim + k)).astype(np.float32),
                                 np.ones(n, bool), tokens, mask)
    return out


def random_impressions(n_news: int = 40, m: int = 12, seed: int = 1) -> Impressions:
    """Impressions with 0..9 clicks of history (the first one empty) and 2..7 candidates."""
    rng = np.random.default_rng(seed)
    hist_len = rng.integers(0, 10, m)
    hist_len[0] = 0
    cand_len = rng.integers(2, 8, m)
    hist_off = np.concatenate([[0], np.cumsum(hist_len)]).astype(np.int64)
    cand_off = np.concatenate([[0], np.cumsum(cand_len)]).astype(np.int64)
    labels = np.zeros(cand_off[-1], np.int8)
    labels[cand_off[:-1]] = 1  # one click per impression, first candidate
    labels[cand_off[:-1] + 1] = rng.integers(0, 2, m)
    return Impressions(
        name="synthetic", impression_ids=np.arange(m, dtype=np.int64) + 1,
        user_ids=np.array([f"U{i}" for i in range(m)], object), times=np.zeros(m, np.int64),
        hist_offsets=hist_off, hist_items=rng.integers(0, n_news, hist_off[-1]).astype(np.int64),
        cand_offsets=cand_off, cand_items=rng.integers(0, n_news, cand_off[-1]).astype(np.int64), labels=labels,
    )


def build(fusion: str, features: dict[str, NewsFeatures], config: NRMSConfig = SMALL, tokens: bool = True):
    roles = NRMS(config, fusion, {r: 1 for r in ROLES}, {r: False for r in ROLES}).roles
    plan = {r: tokens for r in roles}
    widths = {r: features[r].tokens.shape[2] if tokens else features[r].dim for r in roles}
    torch.manual_seed(0)
    model = NRMS(config, fusion, widths, plan).eval()
    return model, NewsBank(features, plan, torch.device("cpu"))


def batch_of(impressions: Impressions, history: int = 6):
    rows, mask = impressions.histories(history)  # (M, H)
    counts = impressions.candidate_counts
    cands = np.stack([impressions.cand_items[o:o + 2] for o in impressions.cand_offsets[:-1]])  # (M, 2)
    assert counts.min() >= 2
    return rows, mask, cands


# ------------------------------------------------------------------------------------------
# Fusions and attention


@pytest.mark.parametrize("name", available())
def test_every_fusion_maps_roles_to_width(name):
    fusion = create_fusion(name, 12)
    assert set(fusion.roles) <= set(FEATURE_ROLES) and fusion.roles
    vectors = {r: torch.randn(5, 12) for r in FEATURE_ROLES}
    out = fusion(vectors)
    assert out.shape == (5, 12) and torch.isfinite(out).all()
    if len(fusion.roles) > 1:
        with pytest.raises(ValueError, match="missing"):
            fusion({fusion.roles[0]: vectors[fusion.roles[0]]})


def test_fusion_registry_names_known_fusions():
    with pytest.raises(PipelineError) as err:
        create_fusion("sum", 8)
    for name in ("hadamard", "concat", "gated", "text", "image", "blip"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="registered twice.*hadamard"):
        register("hadamard", roles=("text",))(lambda v, layers: v["text"])
    with pytest.raises(ValueError, match="roles"):
        register("odd", roles=("audio",))(lambda v, layers: v["audio"])
    assert roles_of("hadamard") == ("text", "image") and label_of("hadamard") == "text+image (hadamard)"


def test_a_fusion_is_one_registered_function(monkeypatch):
    """What adding a fusion takes: one function with its roles and layers; the module, its
    parameters and its place in every registry-built choice follow."""
    import rankers.fusion as fusion

    monkeypatch.setattr(fusion, "_FUSIONS", dict(fusion._FUSIONS))
    register("sum", roles=("text", "image"), label="text+image (sum)", layers={"image": Layer(bias=False)})(
        lambda v, layers: v["text"] + layers["image"](v["image"]))
    module = create_fusion("sum", 4)
    assert [n for n, _ in module.named_parameters()] == ["layers.image.weight"]
    t, i = torch.randn(3, 4), torch.randn(3, 4)
    expected = t + i @ module.layers["image"].weight.T
    torch.testing.assert_close(module({"text": t, "image": i}), expected)
    assert "sum" in available()
    from rankers.registry import ranker_entry

    assert "sum" in ranker_entry("nrms").supported_fusions()
    assert "sum" not in ranker_entry("lightgbm").supported_fusions()


def test_the_fusion_registry_imports_no_torch():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from rankers.fusion import available, roles_of; print(available(), roles_of('gated')); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.splitlines()
    assert out[1] == "False" and "hadamard" in out[0]


def test_attention_ignores_padding_and_survives_empty_rows():
    torch.manual_seed(0)
    pool, mhsa = AdditiveAttention(8, 10).eval(), MaskedSelfAttention(8, 2).eval()
    h = torch.randn(4, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    other = h.clone()
    other[~mask] = torch.randn(int((~mask).sum()), 8) * 100
    for a, b in [(pool(h, mask), pool(other, mask)), (mhsa(h, mask), mhsa(other, mask))]:
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
    alpha = pool.weights(h, mask)
    torch.testing.assert_close(alpha.sum(-1), torch.tensor([1.0, 1.0, 0.0, 1.0]))
    assert (pool(h, mask)[2] == 0).all() and (mhsa(h, mask)[2] == 0).all()


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(0, 6), min_size=1, max_size=5), seed=st.integers(0, 2**16))
def test_attention_output_depends_only_on_real_positions(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(0)
    pool, mhsa = AdditiveAttention(8, 6).eval(), MaskedSelfAttention(8, 4).eval()
    mask = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]  # (B, 6)
    h = torch.randn(len(lengths), 6, 8, generator=gen)
    noisy = torch.where(mask[..., None], h, torch.randn(h.shape, generator=gen) * 1e3)
    with torch.no_grad():
        for layer in (pool, mhsa):
            a, b = layer(h, mask), layer(noisy, mask)
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # A row alone gives what it gives among others.
        for i in range(len(lengths)):
            torch.testing.assert_close(pool(h[i:i + 1], mask[i:i + 1])[0], pool(h, mask)[i], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(mhsa(h[i:i + 1], mask[i:i + 1])[0], mhsa(h, mask)[i], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# The model: masks, independence, dedup, encode-once


@pytest.mark.parametrize("fusion, tokens", [("hadamard", True), ("gated", False), ("blip", True)])
def test_padding_and_other_users_change_nothing(fusion, tokens):
    features = random_features()
    model, bank = build(fusion, features, tokens=tokens)
    imps = random_impressions()
    rows, mask, cands = batch_of(imps)
    batch = batch_tensors(bank, rows, mask, cands)
    with torch.no_grad():
        scores = forward_batch(model, batch)  # (M, 2)
        assert torch.isfinite(scores).all()
        # Padded history slots pointing at other news, padded token vectors replaced by noise.
        moved = batch_tensors(bank, np.where(mask, rows, 17), mask, cands)
        torch.testing.assert_close(forward_batch(model, moved), scores, rtol=0, atol=1e-6)
        noisy = {r: dataclasses.replace(f, tokens=np.where(f.mask[..., None], f.tokens, 50.0).astype(np.float32))
                 for r, f in features.items()}
        _, noisy_bank = build(fusion, noisy, tokens=tokens)
        torch.testing.assert_close(forward_batch(model, batch_tensors(noisy_bank, rows, mask, cands)), scores,
                                   rtol=0, atol=1e-5)
        # Each impression alone gives what it gives inside the batch.
        for i in range(len(imps)):
            alone = forward_batch(model, batch_tensors(bank, rows[i:i + 1], mask[i:i + 1], cands[i:i + 1]))
            torch.testing.assert_close(alone[0], scores[i], rtol=1e-5, atol=1e-5)
        # Nobody has a history: finite, and every user is the learned "no history" vector.
        empty = forward_batch(model, batch_tensors(bank, rows, np.zeros_like(mask), cands))
        assert torch.isfinite(empty).all()
        users = model.encode_user(torch.randn(len(imps), 3, SMALL.dim), torch.zeros(len(imps), 3, dtype=torch.bool))
        assert torch.equal(users, model.user.no_history.expand_as(users))


def test_dedup_equals_naive_encoding_for_scores_loss_and_gradients():
    features = random_features()
    model, bank = build("hadamard", features)
    rows, mask, cands = batch_of(random_impressions())
    results = []
    for dedup in (True, False):
        model.zero_grad()
        batch = batch_tensors(bank, rows, mask, cands, dedup=dedup)
        scores = forward_batch(model, batch)
        loss = train_loss(scores)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((batch.distinct, scores.detach(), loss.detach(), grads))
    (u1, s1, l1, g1), (u2, s2, l2, g2) = results
    assert u1 < u2  # the batch repeats news, dedup encodes fewer
    torch.testing.assert_close(s1, s2, rtol=0, atol=1e-5)
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_encode_once_scoring_equals_per_impression_forward():
    features = random_features()
    model, bank = build("concat", features)
    imps = random_impressions()
    scores = score_impressions(model, bank, imps, chunk=5, row_chunk=7)
    assert scores.dtype == np.float64 and scores.shape == imps.cand_items.shape
    rows, mask = imps.histories(SMALL.history)
    with torch.no_grad():
        for i in range(len(imps)):
            cand = imps.cand_items[imps.cand_offsets[i]:imps.cand_offsets[i + 1]][None]
            naive = forward_batch(model, batch_tensors(bank, rows[i:i + 1], mask[i:i + 1], cand, dedup=False))
            np.testing.assert_allclose(scores[imps.cand_offsets[i]:imps.cand_offsets[i + 1]], naive[0].numpy(),
                                       rtol=1e-5, atol=1e-5)


def test_negatives_come_from_the_same_impression():
    imps = random_impressions(m=60, seed=3)
    samples = build_samples(imps, 4, np.random.default_rng(0))
    row_imp = imps.row_impression
    assert len(samples.impression) == int(((imps.labels == 1) & (np.bincount(row_imp[imps.labels == 0],
                                           minlength=len(imps))[row_imp] > 0)).sum())
    for imp, cands in zip(samples.impression, samples.candidates):
        lo, hi = imps.cand_offsets[imp], imps.cand_offsets[imp + 1]
        items, labels = imps.cand_items[lo:hi], imps.labels[lo:hi]
        assert cands[0] in items[labels == 1]
        negatives = set(items[labels == 0].tolist())
        assert set(cands[1:].tolist()) <= negatives
        n_neg = int((labels == 0).sum())
        if n_neg >= 4 and len(negatives) == n_neg:  # distinct news: no repeats without replacement
            assert len(set(cands[1:].tolist())) == 4
    again = build_samples(imps, 4, np.random.default_rng(0))
    assert np.array_equal(again.candidates, samples.candidates)
    assert not np.array_equal(build_samples(imps, 4, np.random.default_rng(1)).candidates, samples.candidates)


def test_negatives_without_replacement_cover_all_positions():
    # One impression, 1 click and 5 non-clicks: each draw of 4 distinct positions is unbiased.
    imps = dataclasses.replace(random_impressions(m=1), cand_offsets=np.array([0, 6]), cand_items=np.arange(6),
                               labels=np.array([1, 0, 0, 0, 0, 0], np.int8))
    rng = np.random.default_rng(0)
    counts = np.zeros(6)
    for _ in range(500):
        c = build_samples(imps, 4, rng).candidates[0]
        assert len(set(c[1:].tolist())) == 4 and c[0] == 0
        counts[c[1:]] += 1
    assert counts[0] == 0 and np.all(np.abs(counts[1:] / 500 - 0.8) < 0.08)


# ------------------------------------------------------------------------------------------
# The tiny world: learning, dev never in fit, save/load


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from extractors.registry import create
    from extractors.run import extract_catalogue
    from storage.catalogue import load_catalogue
    from storage.synthetic import generate_world

    root = tmp_path_factory.mktemp("nrms")
    generate_world(root / "world", scale="tiny", seed=0)
    catalogue = load_catalogue(root / "world")
    bert = create("bert", titles=[str(t) for t in catalogue.title], workdir=root / "work")
    stores = {
        "text": extract_catalogue(bert, catalogue, root / "features", device="cpu", progress=False).path,
        "image": extract_catalogue(create("vit"), catalogue, root / "features", device="cpu", progress=False).path,
    }
    features = {role: load_features(path, catalogue) for role, path in stores.items()}
    train, valid = carve_validation(load_impressions(root / "world", "train", catalogue))
    dev = load_impressions(root / "world", "dev", catalogue)
    return {"features": features, "train": train, "valid": valid, "dev": dev}


# Pooled features and a 3x higher learning rate than the default: the tiny world has only
# ~500 training impressions (8 batches an epoch). Hadamard(text, image), because the tiny
# world's planted signal is carried by both roles: over seeds 0-2 it reaches dev AUC
# 0.59-0.60, text alone 0.54, and a model fitted on shuffled labels 0.42-0.47.
TINY = NRMSConfig(dim=32, heads=4, additive_hidden=32, epochs=6, patience=2, batch_size=64, lr=3e-3, use_tokens=False)
LEARNED_AUC = 0.56


def test_fit_takes_no_dev_and_learns_the_planted_signal(tiny):
    assert list(inspect.signature(NRMSRanker.fit).parameters) == ["self", "train", "valid", "features"]
    ranker = NRMSRanker("hadamard", TINY, device="cpu", progress=False)
    report = ranker.fit(tiny["train"], tiny["valid"], tiny["features"])
    assert isinstance(report, FitReport) and 1 <= report.best_epoch <= report.epochs == len(report.history)
    valid_counted = evaluate(tiny["valid"].cand_offsets, tiny["valid"].labels,
                             np.zeros(len(tiny["valid"].labels)))["impressions"]
    assert report.valid_metrics["impressions"] == valid_counted  # early stopping looked at valid only
    assert report.train_impressions_per_s > 0 and report.seconds > 0
    dev = evaluate(tiny["dev"].cand_offsets, tiny["dev"].labels, ranker.score(tiny["dev"]))
    assert dev["auc"] > LEARNED_AUC, dev


def test_shuffled_labels_learn_nothing(tiny):
    train = tiny["train"]
    shuffled = dataclasses.replace(train, labels=np.random.default_rng(0).permutation(train.labels))
    ranker = NRMSRanker("hadamard", TINY, device="cpu", progress=False)
    ranker.fit(shuffled, tiny["valid"], tiny["features"])
    dev = evaluate(tiny["dev"].cand_offsets, tiny["dev"].labels, ranker.score(tiny["dev"]))
    assert dev["auc"] < LEARNED_AUC, dev



def test_save_load_round_trip_gives_identical_scores(tiny, tmp_path):
    config = dataclasses.replace(TINY, epochs=1, use_tokens=None, pooled_roles=("image",))
    ranker = NRMSRanker("hadamard", config, device="cpu", progress=False)
    ranker.fit(tiny["train"], tiny["valid"], tiny["features"])
    files = ranker.save(tmp_path / "model")
    assert sorted(p.name for p in files) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "model" / "config.json").read_text())
    assert meta["fusion"] == "hadamard" and meta["tokens"] == {"text": True, "image": False}
    assert meta["config"]["pooled_roles"] == ["image"]
    loaded = NRMSRanker.load(tmp_path / "model", device="cpu", features=tiny["features"])
    assert loaded.config == config
    np.testing.assert_array_equal(loaded.score(tiny["dev"]), ranker.score(tiny["dev"]))
    with pytest.raises(Exception, match="widths"):
        narrow = {r: dataclasses.replace(f, vectors=f.vectors[:, :8]) for r, f in tiny["features"].items()}
        loaded.set_features(narrow)


def test_length_batches_cover_every_sample_once_with_similar_lengths():
    from rankers.train import length_batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 51, size=1000)
    order = rng.permutation(1000)
    batches = length_batches(order, lengths, batch_size=16, rng=np.random.default_rng(1), pool=8)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    assert sorted(len(b) for b in batches) == [8] + [16] * 62  # pools of 128 samples; the last holds 104
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    shuffled_spread = np.mean([np.ptp(lengths[order[i:i + 16]]) for i in range(0, 1000, 16)])
    assert spread < shuffled_spread / 3  # padded to the batch's longest history: far less padding
    again = length_batches(order, lengths, batch_size=16, rng=np.random.default_rng(1), pool=8)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))


def test_cpu_threads_limits_and_restores_torch_threads():
    from rankers.train import cpu_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the suite runs on one thread (conftest)
    try:
        with cpu_threads(torch.device("cpu"), 1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with cpu_threads(torch.device("cpu"), None):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("config", ["rankers.nrms:NRMSConfig", "rankers.finetune:FineTuneConfig", "rankers.lgbm:LGBMConfig"])
def test_saved_configs_with_unknown_fields_are_refused_by_name(config):
    import importlib

    module, name = config.split(":")
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(ValueError, match=rf"unknown {name} fields \['bogus'\]"):
        cls.from_dict({**cls().to_dict(), "bogus": 1})
    assert cls.from_dict(cls().to_dict()) == cls()


# ------------------------------------------------------------------------------------------
# Speed-ups that must change nothing: attention, dropout, one user per impression


def test_self_attention_computes_what_torch_multihead_attention_does():
    torch.manual_seed(0)
    layer = MaskedSelfAttention(16, 4, dropout=0.0)
    h = torch.randn(5, 7, 16)
    mask = torch.arange(7)[None, :] < torch.tensor([7, 3, 0, 1, 5])[:, None]
    expected, _ = layer.attn(h, h, h, key_padding_mask=~mask & mask.any(-1, keepdim=True), need_weights=False)
    expected = expected.masked_fill(~mask[..., None], 0.0)
    for training in (False, True):  # SDPA in eval; on the CPU with dropout 0, SDPA too
        torch.testing.assert_close(layer.train(training)(h, mask), expected, rtol=1e-5, atol=1e-6)
    # Training on the CPU with dropout takes the explicit path: softmax, the keep mask, values.
    layer.attn.dropout = 0.25
    layer.train()
    torch.manual_seed(7)
    got = layer(h, mask)
    torch.manual_seed(7)
    keep = keep_mask((5 * 4, 7, 7), 0.25, h.device)  # the one draw the explicit path makes
    q, k, v = (t.view(5, 7, 4, 4).transpose(1, 2) for t in
               torch.nn.functional.linear(h, layer.attn.in_proj_weight, layer.attn.in_proj_bias).chunk(3, dim=-1))
    attend = (mask | ~mask.any(-1, keepdim=True))[:, None, None, :]
    weights = torch.softmax((q @ k.transpose(-1, -2) / 2.0).masked_fill(~attend, float("-inf")), dim=-1)
    weights = weights * keep.view(5, 4, 7, 7) / 0.75
    out = torch.nn.functional.linear((weights @ v).transpose(1, 2).reshape(5, 7, 16), layer.attn.out_proj.weight,
                                     layer.attn.out_proj.bias)
    torch.testing.assert_close(got, out.masked_fill(~mask[..., None], 0.0), rtol=1e-5, atol=1e-6)
    assert got.requires_grad and torch.isfinite(got).all()


def test_dropout_keeps_the_asked_fraction_reproducibly():
    torch.manual_seed(3)
    keep = keep_mask((400, 1000), 0.2, torch.device("cpu"))
    assert keep.dtype == torch.bool and abs(keep.float().mean().item() - 0.8) < 0.003
    torch.manual_seed(3)
    assert torch.equal(keep_mask((400, 1000), 0.2, torch.device("cpu")), keep)
    assert not torch.equal(keep_mask((400, 1000), 0.2, torch.device("cpu")), keep)
    x = torch.ones(300, 300)
    layer = Dropout(0.5)
    y = layer(x)
    assert set(y.unique().tolist()) == {0.0, 2.0} and abs(y.mean().item() - 1.0) < 0.02  # scaled by 1 / (1 - p)
    assert torch.equal(layer.eval()(x), x)


def test_one_user_per_impression_gives_the_per_sample_scores_and_gradients():
    features = random_features()
    model, bank = build("hadamard", features)
    imps = random_impressions()
    rows, mask = imps.histories(6)
    # Three clicks of impression 4, two of 7, one of 2 (as a batch of samples would hold them).
    sample_imp = np.array([4, 4, 7, 2, 4, 7])
    cands = np.random.default_rng(0).integers(0, 40, (6, 3))
    distinct, users = distinct_users(sample_imp)
    assert distinct.tolist() == [2, 4, 7] and np.array_equal(distinct[users], sample_imp)
    results = []
    for shared in (True, False):
        model.zero_grad()
        if shared:
            batch = batch_tensors(bank, rows[distinct], mask[distinct], cands, users=users)
        else:
            batch = batch_tensors(bank, rows[sample_imp], mask[sample_imp], cands)
        scores = forward_batch(model, batch)
        train_loss(scores).backward()
        results.append((scores.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (s1, g1), (s2, g2) = results
    torch.testing.assert_close(s1, s2, rtol=0, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_impression_order_keeps_each_impressions_clicks_together():
    imps = random_impressions(m=60, seed=3)
    samples = build_samples(imps, 2, np.random.default_rng(0))
    order = impression_order(samples, np.random.default_rng(1))
    assert sorted(order.tolist()) == list(range(len(samples.impression)))
    seq = samples.impression[order]
    runs = seq[np.r_[True, seq[1:] != seq[:-1]]]  # one run per impression
    assert len(runs) == len(set(seq.tolist())) and not np.array_equal(runs, np.sort(runs))


# ------------------------------------------------------------------------------------------
# Early stopping and the caller's random state


def test_early_stopping_keeps_the_best_state_and_stops_after_patience():
    model = torch.nn.Linear(2, 1)
    stopper = EarlyStopping(patience=2)
    weights = {}
    for epoch, auc in enumerate([0.55, 0.60, 0.58, 0.60, 0.59], start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        weights[epoch] = model.weight.clone()
        improved = stopper.update(epoch, auc, model)
        assert improved == (epoch in (1, 2))
        if stopper.stopped:
            break
    assert (epoch, stopper.best_epoch, stopper.best, stopper.stale) == (4, 2, 0.60, 2)  # a tie is not better
    stopper.restore(model)
    assert torch.equal(model.weight, weights[2])
    assert EarlyStopping.from_progress(2, stopper.progress(), stopper.best_state) == stopper
    free = EarlyStopping(patience=1)  # nothing to validate on: every epoch is the best, none stops
    assert all(free.update(e, None) for e in range(1, 5)) and free.best_epoch == 4 and not free.stopped
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0)


def test_fit_leaves_the_callers_random_state_and_is_reproducible():
    features = random_features(n=40)
    train = random_impressions(m=40, seed=5)
    valid = random_impressions(m=12, seed=6)
    config = dataclasses.replace(SMALL, epochs=2, use_tokens=False)
    torch.manual_seed(11)
    caller = torch.get_rng_state()
    scores = []
    for _ in range(2):
        ranker = NRMSRanker("hadamard", config, device="cpu", progress=False)
        ranker.fit(train, valid, features)
        assert torch.equal(torch.get_rng_state(), caller)
        scores.append(ranker.score(valid))
    np.testing.assert_array_equal(scores[0], scores[1])
    other = NRMSRanker("hadamard", dataclasses.replace(config, seed=1), device="cpu", progress=False)
    other.fit(train, valid, features)
    assert not np.array_equal(other.score(valid), scores[0])


def test_token_vectors_from_a_read_only_float16_memmap(tmp_path):
    import warnings

    features = random_features()["text"]
    path = tmp_path / "tokens.f16"
    stored = np.memmap(path, dtype=np.float16, mode="w+", shape=features.tokens.shape)
    stored[:] = features.tokens
    stored.flush()
    mapped = dataclasses.replace(features, tokens=np.memmap(path, dtype=np.float16, mode="r",
                                                            shape=features.tokens.shape))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bank = NewsBank({"text": mapped}, {"text": True}, torch.device("cpu"))
        got = bank.gather(torch.tensor([5, 3]))["text"]
    width = got.tokens.shape[1]
    np.testing.assert_array_equal(got.tokens.numpy(), stored[[5, 3], :width].astype(np.float32))
    assert got.tokens.dtype == torch.float32 and torch.equal(got.mask, torch.from_numpy(features.mask[[5, 3], :width]))
