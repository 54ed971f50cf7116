"""MTRec: the modified gradient surgery on constructed gradients, B/I/O tags from title entity
offsets, the training step's gradient wiring, and auxiliary losses that go down."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from rankers.mtrec import B, I, IGNORE, O, MTRecConfig, MTRecHeads, bio_tags, entity_spans, tag_titles
from rankers.surgery import LAMBDA, combine, project_conflicting



# ------------------------------------------------------------------------------------------
# Gradient surgery


def test_conflicting_auxiliary_gradient_loses_its_component_against_the_main_one():
    g_main = torch.tensor([1.0, 0.0, 0.0])
    g_aux = torch.tensor([-2.0, 1.0, 0.0])  # dot = -2 < 0: conflict
    (g,), step = combine([g_main], [g_aux])
    # Analytic: lambda * g_aux = (-0.6, 0.3, 0); its projection off g_main is (0, 0.3, 0).
    torch.testing.assert_close(g, torch.tensor([1.0, 0.3, 0.0]))
    assert step.projected and step.cosine < 0
    aux_part = g - g_main
    assert abs(float(aux_part @ g_main)) < 1e-7  # nothing left against (or along) g_main
    torch.testing.assert_close(project_conflicting(g_main, LAMBDA * g_aux), aux_part)


def test_agreeing_auxiliary_gradient_is_added_unchanged():
    g_main = torch.tensor([1.0, 2.0])
    g_aux = torch.tensor([0.5, -0.1])  # dot = 0.3 > 0
    (g,), step = combine([g_main], [g_aux])
    torch.testing.assert_close(g, g_main + LAMBDA * g_aux)
    assert not step.projected and step.cosine > 0
    torch.testing.assert_close(project_conflicting(g_main, g_aux), g_aux)


@settings(max_examples=60, deadline=None)
@given(
    main=arrays(np.float64, 12, elements=st.floats(-5, 5)),
    aux=arrays(np.float64, 12, elements=st.floats(-5, 5)),
    split=st.integers(1, 11),
    weight=st.floats(0.05, 1.0),
)
def test_surgery_over_parameter_lists_equals_the_flat_formula(main, aux, split, weight):
    m, a = torch.from_numpy(main), torch.from_numpy(aux)
    # Per-parameter lists (two "parameters") behave as the flattened vector does.
    got, step = combine([m[:split], m[split:]], [a[:split], a[split:]], weight)
    g = torch.cat(got)
    wa = weight * a
    dot, norm2 = float(wa @ m), float(m @ m)
    expected = m + (wa - dot / norm2 * m if dot < 0 and norm2 > 0 else wa)
    torch.testing.assert_close(g, expected, rtol=1e-9, atol=1e-9)
    if abs(dot) > 1e-9:  # at a dot product of about 0, summation order may decide either way
        assert step.projected == (dot < 0 and norm2 > 0)
    assert -1.0 - 1e-9 <= step.cosine <= 1.0 + 1e-9
    # The result never points against the main gradient more than g_main itself allows.
    assert float((g - m) @ m) >= -1e-9 * max(1.0, norm2)


def test_parameters_one_task_does_not_reach_count_as_zero():
    g, _ = combine([torch.tensor([1.0]), None], [torch.tensor([-1.0]), torch.tensor([2.0])])
    torch.testing.assert_close(g[0], torch.tensor([1.0]))  # -0.3 projected away entirely
    torch.testing.assert_close(g[1], torch.tensor([0.6]))
    with pytest.raises(ValueError, match="length"):
        combine([torch.zeros(1)], [])


# ------------------------------------------------------------------------------------------
# B/I/O tags from title entities


@pytest.fixture(scope="module")
def tokenizer():
    from extractors.tokenizer import train_wordpiece

    # "Greenhaven" is not among these words, so it is split into word pieces.
    return train_wordpiece(["Storm hits New York City today", "Flooding in the county", "Storm warning", "Heavy rain"])


def test_bio_tags_from_offsets_on_a_constructed_title(tokenizer):
    title = "Storm hits New York City today"
    ents = json.dumps([{"Label": "New York City", "Type": "G", "OccurrenceOffsets": [11],
                        "SurfaceForms": ["New York City"]}])
    assert entity_spans(title, ents) == [(11, 24)]
    tags = tag_titles(tokenizer, [title], [ents], max_length=12)[0]
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(title)["input_ids"])
    assert tokens == ["[CLS]", "storm", "hits", "new", "york", "city", "today", "[SEP]"]
    assert tags.tolist() == [IGNORE, O, O, B, I, I, O, IGNORE] + [IGNORE] * 4


def test_bio_tags_mark_every_word_piece_and_survive_bad_offsets(tokenizer):
    title = "Flooding in Greenhaven county"
    # A word outside the tiny vocabulary splits into pieces: B on the first, I on the rest.
    ents = json.dumps([{"Label": "Greenhaven", "OccurrenceOffsets": [12], "SurfaceForms": ["Greenhaven"]}])
    enc = tokenizer(title, return_offsets_mapping=True, return_special_tokens_mask=True)
    pieces = [t for t, (s, e) in zip(tokenizer.convert_ids_to_tokens(enc["input_ids"]), enc["offset_mapping"])
              if s >= 12 and e <= 22 and e > s]
    assert len(pieces) > 1
    tags = tag_titles(tokenizer, [title], [ents], max_length=24)[0]
    assert (tags == B).sum() == 1 and (tags == I).sum() == len(pieces) - 1
    # A wrong offset falls back to exact matching of the surface form; an absent form tags nothing.
    moved = json.dumps([{"Label": "Greenhaven", "OccurrenceOffsets": [3], "SurfaceForms": ["Greenhaven"]}])
    np.testing.assert_array_equal(tag_titles(tokenizer, [title], [moved], 24)[0], tags)
    absent = json.dumps([{"Label": "Nowhere", "OccurrenceOffsets": [0], "SurfaceForms": ["Nowhere"]}])
    for raw in (absent, "", "not json"):
        assert set(tag_titles(tokenizer, [title], [raw], 24)[0].tolist()) <= {O, IGNORE}
    offsets = np.array([[0, 0], [0, 3], [4, 6], [0, 0]])
    assert bio_tags([(4, 6)], offsets, np.array([False, True, True, False])).tolist() == [IGNORE, O, B, IGNORE]


def test_every_synthetic_title_entity_is_tagged(tiny_world):
    from extractors.tokenizer import train_wordpiece
    from storage.catalogue import load_catalogue

    cat = load_catalogue(tiny_world)
    tok = train_wordpiece([str(t) for t in cat.title])
    tags = tag_titles(tok, cat.title, cat.title_entities, max_length=64)
    occurrences = sum(len(e["OccurrenceOffsets"]) for raw in cat.title_entities for e in json.loads(raw or "[]"))
    assert occurrences > 50
    assert int((tags == B).sum()) == occurrences  # every mention found where its offset says
    assert ((tags == I).sum(axis=1) > 0).sum() > 10  # multi-token entities get I tags


# ------------------------------------------------------------------------------------------
# Training: the gradient wiring and the auxiliary losses


def test_heads_follow_the_ablation_flags():
    h = torch.randn(3, 5, 8)
    cats, tags = torch.tensor([0, 1, 2]), torch.full((3, 5), IGNORE)
    tags[:, 1] = O
    for cfg, keys in [(MTRecConfig(), {"category", "ner"}), (MTRecConfig(ner=False), {"category"}),
                      (MTRecConfig(category=False), {"ner"})]:
        losses = MTRecHeads(8, 4, cfg).losses(h, cats, tags)
        assert set(losses) == keys and all(torch.isfinite(v) for v in losses.values())
    assert not MTRecConfig(category=False, ner=False).active
    with pytest.raises(ValueError, match="lambda"):
        MTRecConfig(weight=0.0)


TINY_HEAD = dict(dim=16, heads=2, additive_hidden=16, history=10, batch_size=24, lr=3e-3)


@pytest.fixture(scope="module")
def tiny(tiny_world):
    from rankers.data import carve_validation, load_impressions
    from storage.catalogue import load_catalogue

    cat = load_catalogue(tiny_world)
    train, valid = carve_validation(load_impressions(tiny_world, "train", cat))
    return cat, train, valid


def test_surgery_step_writes_the_combined_gradient_into_the_text_encoder(tiny):
    from rankers.finetune import FineTuneConfig, FineTuneRanker, _Accumulator
    from rankers.nrms import NRMSConfig
    from rankers.surgery import combine as combine_
    from rankers.train import batch_tensors, build_samples

    cat, train, _ = tiny
    cfg = FineTuneConfig(mtrec=MTRecConfig(), accumulate=1, ranker=NRMSConfig(**TINY_HEAD, dropout=0.0))
    ranker = FineTuneRanker(cat, cfg, device="cpu", progress=False)
    ranker._build(None)
    model = ranker.model.eval()
    samples = build_samples(train, 4, np.random.default_rng(0))
    history, mask = train.histories(10)
    imp = samples.impression[:12]
    batch = batch_tensors(ranker.bank, history[imp], mask[imp], samples.candidates[:12])
    shared = ranker._shared_params()
    assert shared and all(any(p is q for q in model.extractors["text"].parameters()) for p in shared)

    losses = ranker._losses(batch)
    g_main = torch.autograd.grad(losses["main"], shared, retain_graph=True, allow_unused=True)
    g_aux = torch.autograd.grad(losses["category"] + losses["ner"], shared, retain_graph=True, allow_unused=True)
    expected, step = combine_(list(g_main), list(g_aux), LAMBDA)

    model.zero_grad(set_to_none=True)
    acc = _Accumulator(shared)
    acc.backward(ranker._losses(batch), 1.0, cfg.mtrec)
    got = acc.finish()
    assert got == step
    for p, e in zip(shared, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)
    # The auxiliary heads learn from their own losses, the ranking head from the main loss only.
    assert all(p.grad is not None for p in model.aux.parameters())
    assert all(p.grad is not None for p in model.head.user.parameters())


def test_mtrec_training_runs_and_the_auxiliary_losses_decrease(tiny):
    from rankers.finetune import FineTuneConfig, FineTuneRanker
    from rankers.nrms import NRMSConfig

    cat, train, valid = tiny
    cfg = FineTuneConfig(mtrec=MTRecConfig(), accumulate=1, ranker=NRMSConfig(**TINY_HEAD, epochs=3, patience=3))
    ranker = FineTuneRanker(cat, cfg, device="cpu", progress=False)
    report = ranker.fit(train, valid)
    first, last = report.history[0], report.history[-1]
    assert report.epochs == 3
    assert last["loss_category"] < first["loss_category"] - 0.05, report.history
    assert last["loss_ner"] < 0.5 * first["loss_ner"], report.history
    assert 0.0 <= last["surgery_projected"] <= 1.0 and -1.0 <= last["surgery_cosine"] <= 1.0
    scores = ranker.score(valid)
    assert scores.shape == valid.cand_items.shape and np.isfinite(scores).all()
