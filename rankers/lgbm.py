"""A LightGBM lambdarank ranker over hand-made user-candidate features (the GBDT baseline).

One row per (impression, candidate), grouped by impression. For every feature role the
ranker uses (`sources`, any of rankers.base.ROLES), after centring the role's vectors on
their mean over present news (a frozen encoder's vectors share one large common direction
that otherwise dominates every dot product; on the small synthetic world's tiny ViT the
raw user-candidate cosine even ranks below chance, dev AUC 0.47, and 0.56 once centred):
- news vectors: the store's pooled vector, or (`pooling`, default `auto`: where the store
  was loaded with tokens) the mean of its token vectors: the tiny random-initialised
  extractors put little in their CLS vector (on the small synthetic world a linear probe
  finds the topic of 18% of news from tiny BERT's CLS, 73% from its token mean, 10% by
  chance); at MIND scale, load the stores without tokens to use the pooled vectors;
- the user vector u: the mean of the role's vectors over the most recent H = 50 history
  clicks, counting only news whose store has a real vector (`present`): an image store
  holds a stand-in vector for a news without a cover, and averaging those in would blur a
  user's visual taste with title cards;
- `{role}_h0 .. {role}_h{D-1}`: u * c, the Hadamard product with the candidate vector c, so
  the trees can weigh each direction of agreement on its own;
- `{role}_dot` (u . c) and `{role}_cos` (0 where either vector is zero, e.g. no history).
With both `text` and `image` and `fuse="hadamard"`, each news also gets the fused vector
f = text * image (the fusion of Zhao's thesis, without learned projections, so both widths
must agree), and `fused_dot` / `fused_cos` compare the user's mean fused vector with the
candidate's: a topic direction counts only where the cover agrees.
Then, per row: `hist_len` (clicks in the whole history, uncapped), `has_cover` (the
candidate has a cover image: an explicit `has_cover` array, else the `present` flags of an
`image`, `blip` or other image/multimodal store among the features) and `n_candidates`
(candidates in the impression). `cover_feature` None (the default) adds `has_cover` when
the cover flags are known, so a ranker given only text stores stays blind to covers (on
the synthetic world a cover alone raises the click logit, see storage/synthetic.py, and
an image store's vectors tell covers from title cards anyway); True requires it, False
leaves it out.

Training: lambdarank grouped by impression, NDCG@10 on the time-carved `valid` split for
early stopping (dev is never seen). Impressions with no click or no non-click carry no
pairwise signal and are dropped from train and valid (counted in the ranker's `fit_info`,
also saved in config.json; FitReport.history holds valid NDCG@10 per boosting round). Optional
negative subsampling for large data keeps every click and a seeded fraction of each
impression's non-clicks (at least one). The feature matrix is built vectorised (float32)
in chunks of rows, and scoring runs chunk by chunk, so memory stays bounded at MIND scale.

Saved as `model.txt` (LightGBM's text format), `config.json` (hyperparameters, feature
names, what fitting did), `centres.npz` (the per-role centres, so a loaded model builds
the same features) and `importance.json` (gain per feature, largest first).
Letters: M impressions, T candidate rows, N news, H history, D width, F features.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from rankers.base import ROLES, FitReport, check_fields
from rankers.data import HISTORY, Impressions, NewsFeatures
from rankers.metrics import evaluate
from storage.errors import PipelineError

MODEL_FILE = "model.txt"
CONFIG_FILE = "config.json"
IMPORTANCE_FILE = "importance.json"
CENTRES_FILE = "centres.npz"
FORMAT = "mmnews-lightgbm-v1"
ROWS_PER_CHUNK = 1 << 16
"""Candidate rows whose features are built (and scored) at once: bounds the temporaries."""
GATHER_FLOATS = 1 << 24
"""History vectors gathered at once for user means (64 MB of float32)."""
EVAL_AT = 10
"""Early stopping watches NDCG@10 on valid, the deepest cut-off the report uses."""



def mirror_fusion(fusion: str) -> dict[str, Any]:
    """The LGBMConfig fields that mirror rankers.fusion's `fusion`: `sources` its store roles,
    `fuse` the Hadamard product when the fusion is `hadamard`, and for a fusion with the cover
    flag (`text+cover`) `cover_feature` True (the flag comes as `has_cover`). Which fusions
    LightGBM trains on is its entry in rankers.registry."""
    from rankers.fusion import COVER, roles_of
    from rankers.registry import ranker_entry

    entry = ranker_entry("lightgbm")
    if not entry.supports(fusion):
        raise PipelineError(f"LightGBM cannot mirror fusion {fusion!r}; known to LightGBM: "
                            f"{', '.join(entry.supported_fusions())}")
    roles = roles_of(fusion)
    fields: dict[str, Any] = {"sources": tuple(r for r in roles if r != COVER),
                              "fuse": "hadamard" if fusion == "hadamard" else "none"}
    if COVER in roles:
        fields["cover_feature"] = True
    return fields


@dataclass(frozen=True)
class LGBMConfig:
    """Features and hyperparameters. `neg_fraction` 1.0 keeps every non-click."""

    sources: tuple[str, ...] = ("text",)
    fuse: Literal["none", "hadamard"] = "hadamard"  # only used when text and image are both sources
    pooling: Literal["auto", "vector", "mean"] = "auto"  # auto: token mean where the store has tokens
    history: int = HISTORY
    cover_feature: bool | None = None  # None: has_cover where cover flags are known
    n_estimators: int = 500
    patience: int = 30  # boosting rounds without a better valid NDCG@10 before stopping
    learning_rate: float = 0.05
    num_leaves: int = 31
    min_child_samples: int = 20
    neg_fraction: float = 1.0
    seed: int = 0
    # One thread: LightGBM's OpenMP threads spin while waiting, and on the shared 2-core
    # machines 2 threads fitted 3x slower than 1 (benchmarks/lgbm.py); raise it on big hosts.
    n_jobs: int = 1

    def __post_init__(self) -> None:
        sources = (self.sources,) if isinstance(self.sources, str) else tuple(self.sources)
        if len(sources) == 1 and "+" in sources[0]:
            sources = tuple(sources[0].split("+"))
        object.__setattr__(self, "sources", sources)
        unknown = [s for s in sources if s not in ROLES]
        if not sources or unknown or len(set(sources)) != len(sources):
            raise ValueError(f"LGBMConfig sources {sources!r}: give distinct roles among {', '.join(ROLES)}")
        checks = {
            "fuse": self.fuse in ("none", "hadamard"), "pooling": self.pooling in ("auto", "vector", "mean"),
            "history": self.history > 0,
            "n_estimators": self.n_estimators > 0, "patience": self.patience > 0,
            "learning_rate": self.learning_rate > 0, "num_leaves": self.num_leaves > 1,
            "min_child_samples": self.min_child_samples > 0, "neg_fraction": 0.0 < self.neg_fraction <= 1.0,
            "n_jobs": self.n_jobs != 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid LGBMConfig {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)} "
                             "(fuse is 'none' or 'hadamard'; pooling 'auto', 'vector' or 'mean'; "
                             "neg_fraction in (0, 1])")

    @property
    def fused(self) -> bool:
        return self.fuse == "hadamard" and "text" in self.sources and "image" in self.sources

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["sources"] = list(self.sources)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LGBMConfig:
        check_fields(cls, data)
        return cls(**{**data, "sources": tuple(data.get("sources", cls.sources))})


# ----------------------------------------------------------------------------- features


def feature_names(config: LGBMConfig, dims: Mapping[str, int], cover: bool = True) -> list[str]:
    """The F column names, in matrix order, for roles of widths `dims`, with `has_cover`
    when `cover` (see FeatureBuilder.cover)."""
    names: list[str] = []
    for role in config.sources:
        names += [f"{role}_h{j}" for j in range(dims[role])] + [f"{role}_dot", f"{role}_cos"]
    if config.fused:
        names += ["fused_dot", "fused_cos"]
    names += ["hist_len"] + (["has_cover"] if cover else []) + ["n_candidates"]
    return names


def resolve_cover(features: Mapping[str, NewsFeatures], has_cover: np.ndarray | None = None) -> np.ndarray | None:
    """(N,) bool: which news have a cover. An explicit array wins; else the `present` flags
    of the image store, then blip, then any image/multimodal store; None when none is there."""
    if has_cover is not None:
        return np.asarray(has_cover, dtype=bool)
    for role in ("image", "blip"):
        if role in features:
            return features[role].present
    for feats in features.values():
        if feats.modality in ("image", "multimodal"):
            return feats.present
    return None


def user_vectors(
    rows: np.ndarray, mask: np.ndarray, vectors: np.ndarray, present: np.ndarray
) -> np.ndarray:
    """(M, D) float32 mean of the history vectors that are present; zeros without any.

    rows, mask: (M, H) from Impressions.histories. Gathers in chunks of impressions so the
    (m, H, D) temporary stays under GATHER_FLOATS floats.
    """
    m, h = rows.shape
    d = vectors.shape[1]
    out = np.zeros((m, d), dtype=np.float32)
    step = max(1, GATHER_FLOATS // max(h * d, 1))
    for a in range(0, m, step):
        r = rows[a:a + step]  # (m, H)
        w = (mask[a:a + step] & present[r]).astype(np.float32)  # (m, H)
        total = np.einsum("mh,mhd->md", w, vectors[r], dtype=np.float32)  # (m, D)
        count = w.sum(axis=1, keepdims=True)  # (m, 1)
        out[a:a + step] = total / np.maximum(count, 1.0)
    return out


def _cosine(dot: np.ndarray, norm_u: np.ndarray, norm_c: np.ndarray) -> np.ndarray:
    denom = norm_u * norm_c
    return np.divide(dot, denom, out=np.zeros_like(dot), where=denom > 0)


def resolve_pooling(config: LGBMConfig, features: Mapping[str, NewsFeatures]) -> dict[str, str]:
    """Per used role, how a news vector is made: `mean` of the store's token vectors, or its
    pooled `vector`. `auto` takes the token mean where the store was loaded with tokens."""
    out = {}
    for role in config.sources:
        has_tokens = features[role].tokens is not None and features[role].mask is not None
        if config.pooling == "mean" and not has_tokens:
            raise PipelineError(f"pooling='mean' needs token vectors, but store {features[role].name!r} ({role}) "
                                "was loaded without them; load it with tokens=True or use pooling='vector'")
        out[role] = "mean" if config.pooling == "mean" or (config.pooling == "auto" and has_tokens) else "vector"
    return out


def pooled_vectors(feats: NewsFeatures, pooling: str) -> np.ndarray:
    """(N, D) float32 news vectors: the store's vectors, or the masked mean of its tokens."""
    if pooling == "vector":
        return feats.vectors
    n, length, d = feats.tokens.shape
    out = np.zeros((n, d), dtype=np.float32)
    step = max(1, GATHER_FLOATS // max(length * d, 1))
    for a in range(0, n, step):
        w = feats.mask[a:a + step].astype(np.float32)  # (n, L)
        total = np.einsum("nl,nld->nd", w, feats.tokens[a:a + step], dtype=np.float32)  # (n, D)
        out[a:a + step] = total / np.maximum(w.sum(axis=1, keepdims=True), 1.0)
    return out


class FeatureBuilder:
    """The news-side tables of one configuration, built once, and `matrix(impressions)`.

    `centres` (role -> (D,)) default to the mean pooled vector over present news;
    `has_cover` (N,) bool is required when `config.cover_feature` is True, used when it is
    None, and ignored when it is False.
    """

    def __init__(self, config: LGBMConfig, features: Mapping[str, NewsFeatures],
                 has_cover: np.ndarray | None = None, centres: Mapping[str, np.ndarray] | None = None):
        check_features(config, features)
        if config.cover_feature and has_cover is None:
            raise PipelineError("cover_feature=True needs cover flags: pass has_cover, give an image or blip "
                                "store, or leave cover_feature unset")
        self.cover = has_cover is not None and config.cover_feature is not False
        self.config = config
        self.pooling = resolve_pooling(config, features)
        vectors = {r: pooled_vectors(features[r], self.pooling[r]) for r in config.sources}  # (N, D) each
        present = {r: features[r].present for r in config.sources}
        self.dims = {r: int(v.shape[1]) for r, v in vectors.items()}
        if config.fused and self.dims["text"] != self.dims["image"]:
            raise PipelineError(f"fuse='hadamard' multiplies text and image vectors, but store "
                                f"{features['text'].name!r} gives {self.dims['text']} dimensions and "
                                f"{features['image'].name!r} {self.dims['image']}; use fuse='none'")
        if centres is None:
            centres = {r: (v[present[r]] if present[r].any() else v).mean(axis=0, dtype=np.float64)
                       for r, v in vectors.items()}
        self.centres = {r: np.asarray(c, dtype=np.float32) for r, c in centres.items()}
        bad = [r for r in config.sources if self.centres.get(r, np.empty(0)).shape != (self.dims[r],)]
        if bad:
            raise PipelineError(f"the centres of {', '.join(bad)} do not match the stores' widths {self.dims}")
        self.names = feature_names(config, self.dims, self.cover)
        self.n_news = features[config.sources[0]].vectors.shape[0]
        self.has_cover = has_cover if self.cover else None
        # Per role (and `fused`): (N, D) centred vectors and (N,) present flags.
        self.tables = {r: (vectors[r] - self.centres[r], present[r]) for r in config.sources}
        if config.fused:
            (text, text_present), (image, image_present) = self.tables["text"], self.tables["image"]
            # Only history news with a real cover say anything about the fused taste.
            self.tables["fused"] = (text * image, text_present & image_present)  # (N, D)
        self.news_norm = {name: np.linalg.norm(vec, axis=1) for name, (vec, _) in self.tables.items()}  # (N,)

    def matrix(self, impressions: Impressions, rows: np.ndarray | None = None) -> np.ndarray:
        """(T', F) float32 features of candidate rows `rows` (sorted indices; default all T).

        User vectors are computed once per impression that `rows` touch, then every block
        is filled for ROWS_PER_CHUNK rows at a time.
        """
        cfg, tables = self.config, self.tables
        top = max(int(impressions.cand_items.max(initial=-1)), int(impressions.hist_items.max(initial=-1)))
        if top >= self.n_news:
            raise PipelineError(f"split {impressions.name!r} refers to news row {top} but the features hold "
                                f"{self.n_news} news; use stores extracted from the same catalogue")
        row_imp = impressions.row_impression  # (T,)
        rows = np.arange(len(row_imp)) if rows is None else np.asarray(rows, dtype=np.int64)
        imps, local = np.unique(row_imp[rows], return_inverse=True)  # (M',), (T',)
        hist_rows, hist_mask = impressions.histories(cfg.history)
        hist_rows, hist_mask = hist_rows[imps], hist_mask[imps]  # (M', H)
        users = {name: user_vectors(hist_rows, hist_mask, vec, present) for name, (vec, present) in tables.items()}
        user_norm = {name: np.linalg.norm(u, axis=1) for name, u in users.items()}  # (M',)
        hist_len = impressions.history_lengths[imps].astype(np.float32)  # (M',)
        n_cands = impressions.candidate_counts[imps].astype(np.float32)  # (M',)

        out = np.empty((len(rows), len(self.names)), dtype=np.float32)  # (T', F)
        for a in range(0, len(rows), ROWS_PER_CHUNK):
            b = min(a + ROWS_PER_CHUNK, len(rows))
            cand = impressions.cand_items[rows[a:b]]  # (t,)
            imp = local[a:b]  # (t,)
            col = 0
            for role in cfg.sources:
                d = self.dims[role]
                block = out[a:b, col:col + d]
                np.multiply(users[role][imp], tables[role][0][cand], out=block)  # (t, D)
                dot = block.sum(axis=1)  # (t,)
                out[a:b, col + d] = dot
                out[a:b, col + d + 1] = _cosine(dot, user_norm[role][imp], self.news_norm[role][cand])
                col += d + 2
            if cfg.fused:
                dot = np.einsum("td,td->t", users["fused"][imp], tables["fused"][0][cand], dtype=np.float32)
                out[a:b, col] = dot
                out[a:b, col + 1] = _cosine(dot, user_norm["fused"][imp], self.news_norm["fused"][cand])
                col += 2
            out[a:b, col] = hist_len[imp]
            col += 1
            if self.cover:
                out[a:b, col] = self.has_cover[cand]
                col += 1
            out[a:b, col] = n_cands[imp]
        return out


def feature_matrix(
    impressions: Impressions,
    features: Mapping[str, NewsFeatures],
    config: LGBMConfig,
    has_cover: np.ndarray | None = None,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """(T', F) float32 features of `impressions` (candidate rows `rows`, default all), with
    columns `feature_names(config, dims)`; see FeatureBuilder."""
    return FeatureBuilder(config, features, has_cover).matrix(impressions, rows)


def check_features(config: LGBMConfig, features: Mapping[str, NewsFeatures]) -> None:
    missing = [r for r in config.sources if r not in features]
    if missing:
        raise PipelineError(f"LightGBM sources {'+'.join(config.sources)} need feature roles "
                            f"{', '.join(missing)}; given: {', '.join(sorted(features)) or 'none'}")
    sizes = {features[r].vectors.shape[0] for r in config.sources}
    if len(sizes) != 1:
        raise PipelineError(f"the feature stores of {', '.join(config.sources)} have different news counts "
                            f"{sorted(sizes)}; extract them from the same catalogue")


# ----------------------------------------------------------------------------- training rows


def useful_impressions(impressions: Impressions) -> np.ndarray:
    """(M,) bool: the impression has a click and a non-click (the only ones lambdarank learns from)."""
    clicks = _click_counts(impressions)  # (M,)
    return (clicks > 0) & (clicks < impressions.candidate_counts)


def _click_counts(impressions: Impressions) -> np.ndarray:
    return np.bincount(impressions.row_impression[impressions.labels == 1], minlength=len(impressions))


def subsample_negatives(offsets: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """(T,) bool rows to keep: every click, and per impression ceil(fraction * non-clicks)
    non-clicks (at least one where there are any), chosen uniformly by a seeded generator."""
    t = len(labels)
    if fraction >= 1.0:
        return np.ones(t, dtype=bool)
    imp = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))  # (T,)
    neg = labels == 0
    n_neg = np.bincount(imp[neg], minlength=len(offsets) - 1)  # (M,)
    quota = np.where(n_neg > 0, np.maximum(1, np.ceil(fraction * n_neg)), 0)  # (M,)
    # Rank each non-click within its impression by a random key; keep the first `quota`.
    key = np.random.default_rng(seed).random(t)
    order = np.lexsort((key, ~neg, imp))  # by impression, non-clicks first, then key
    start = np.searchsorted(imp[order], imp[order], side="left")  # first slot of its impression
    rank = np.empty(t, dtype=np.int64)
    rank[order] = np.arange(t) - start
    return ~neg | (rank < quota[imp])


@dataclass(frozen=True)
class TrainingRows:
    """The rows lambdarank learns from, in impression order (V valid rows)."""

    x: np.ndarray  # (T', F) float32
    y: np.ndarray  # (T',) int8 labels
    group: np.ndarray  # (M',) rows per train impression, in row order
    valid: Impressions | None  # the valid impressions with a click and a non-click, if any
    valid_x: np.ndarray | None  # (V, F) their features


# ----------------------------------------------------------------------------- the ranker


class LightGBMRanker:
    """LightGBM lambdarank over the features above, keeping rankers.base.Ranker.

    `LightGBMRanker(config=None, *, fusion=None, has_cover=None, **options)`: `options` are
    LGBMConfig fields; `fusion` (text | image | blip | hadamard, as rankers.fusion) sets
    `sources` and `fuse` at once. `fit`, `score`, `save`; `LightGBMRanker.load(folder,
    features)`. Scoring needs the features it was fitted with (or `set_features`).
    """

    def __init__(self, config: LGBMConfig | None = None, *, fusion: str | None = None,
                 has_cover: np.ndarray | None = None, **options: Any):
        config = config or LGBMConfig()
        if fusion is not None:
            options = {**mirror_fusion(fusion), **options}
        known = {f.name for f in fields(LGBMConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise PipelineError(f"unknown LightGBM options {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        self.config = replace(config, **options)
        self.name = f"lightgbm-{self._label()}"
        self._explicit_cover = None if has_cover is None else np.asarray(has_cover, dtype=bool)
        self.booster = None  # lightgbm.Booster once fitted or loaded
        self.best_iteration = 0
        self.feature_names: list[str] = []
        self.fit_info: dict[str, Any] = {}
        self.store_names: dict[str, str] = {}
        self._builder: FeatureBuilder | _Trained | None = None

    def _label(self) -> str:
        from rankers.registry import ranker_entry

        for name in ranker_entry("lightgbm").supported_fusions():
            fields = mirror_fusion(name)
            if (self.config.sources == fields["sources"] and (len(fields["sources"]) == 1 or self.config.fuse == fields["fuse"])
                    and bool(self.config.cover_feature) == fields.get("cover_feature", False)):
                return name
        return "+".join(self.config.sources)

    # -- features -----------------------------------------------------------------------
    def set_features(self, features: Mapping[str, NewsFeatures], has_cover: np.ndarray | None = None) -> None:
        """Attach the stores to build features from. A fitted or loaded model keeps its
        centres and checks that the stores give the columns it was trained on."""
        check_features(self.config, features)
        cover = resolve_cover(features, has_cover if has_cover is not None else self._explicit_cover)
        fitted = self.booster is not None
        # A trained model needs exactly the cover column it was trained with.
        wants_cover = "has_cover" in self.feature_names if fitted else self.config.cover_feature
        if wants_cover and cover is None:
            raise PipelineError(
                f"{'the model was trained with' if fitted else 'cover_feature=True needs'} the has_cover feature: "
                "pass has_cover=, or include an 'image' or 'blip' store in the features"
            )
        if wants_cover is False:
            cover = None
        n = features[self.config.sources[0]].vectors.shape[0]
        if cover is not None and len(cover) != n:
            raise PipelineError(f"has_cover has {len(cover)} entries but the stores hold {n} news")
        builder = FeatureBuilder(self.config, features, cover, self._builder.centres if fitted else None)
        if fitted and builder.pooling != self._builder.pooling:
            raise PipelineError(f"the model pooled its news vectors as {self._builder.pooling} but these stores give "
                                f"{builder.pooling}; load the stores with tokens as when it was trained")
        if fitted and builder.names != self.feature_names:
            raise PipelineError(f"these stores give {len(builder.names)} features but the model was trained on "
                                f"{len(self.feature_names)}; use the stores it was trained on")
        self._builder = builder
        self.feature_names = builder.names
        self.store_names = {r: features[r].name for r in self.config.sources}

    def features_of(self, impressions: Impressions, rows: np.ndarray | None = None) -> np.ndarray:
        """(T', F) float32 feature matrix of `impressions` (rows `rows`, default all)."""
        if not isinstance(self._builder, FeatureBuilder):
            raise PipelineError("the ranker has no features: fit it, or call set_features")
        return self._builder.matrix(impressions, rows)

    # -- training -----------------------------------------------------------------------
    def training_rows(self, train: Impressions, valid: Impressions, features: Mapping[str, NewsFeatures]) -> TrainingRows:
        """Attach `features` (new centres) and build the rows lambdarank learns from; sets `fit_info`.
        Shared by `fit` and rankers.lgbm_dask, so both train on exactly the same rows."""
        cfg = self.config
        if not train.labeled:
            raise PipelineError(f"split {train.name!r} is unlabeled; a ranker trains on labeled impressions")
        self.booster, self._builder = None, None  # a new fit: new centres, any stores
        self.set_features(features)
        useful = useful_impressions(train)
        clicks = _click_counts(train)  # (M,)
        fit_train = train.select(useful, "train")
        if len(fit_train) == 0:
            raise PipelineError(f"none of the {len(train)} train impressions has both a click and a non-click")
        keep = subsample_negatives(fit_train.cand_offsets, fit_train.labels, cfg.neg_fraction, cfg.seed)
        x = self.features_of(fit_train, np.flatnonzero(keep))  # (T', F)
        y = fit_train.labels[keep]
        group = np.bincount(fit_train.row_impression[keep], minlength=len(fit_train))  # (M',)

        fit_valid, valid_x = None, None
        valid_useful = useful_impressions(valid) if len(valid) and valid.labeled else np.zeros(len(valid), bool)
        if valid_useful.any():
            fit_valid = valid.select(valid_useful, "valid")
            valid_x = self.features_of(fit_valid)  # (V, F)
        self.fit_info = {
            "train_impressions": len(train),
            "train_impressions_used": len(fit_train),
            "train_dropped_no_click": int(np.count_nonzero(clicks == 0)),
            "train_dropped_no_nonclick": int(np.count_nonzero(~useful & (clicks > 0))),
            "train_rows": int(len(y)),
            "train_negatives_dropped": int(np.count_nonzero(~keep)),
            "valid_impressions": len(valid),
            "valid_impressions_used": int(np.count_nonzero(valid_useful)),
            "features": len(self.feature_names),
        }
        return TrainingRows(x, y, group, fit_valid, valid_x)

    def fit(self, train: Impressions, valid: Impressions, features: dict[str, NewsFeatures]) -> FitReport:
        import lightgbm as lgb

        cfg = self.config
        started = time.perf_counter()
        rows = self.training_rows(train, valid, features)
        x, y, group = rows.x, rows.y, rows.group
        eval_kw: dict[str, Any] = {}
        if rows.valid is not None:
            eval_kw = dict(eval_X=(rows.valid_x,), eval_y=(rows.valid.labels,), eval_group=[rows.valid.candidate_counts],
                           eval_names=["valid"], eval_at=[EVAL_AT])
        features_seconds = time.perf_counter() - started

        evals: dict[str, dict[str, list[float]]] = {}
        callbacks = [lgb.record_evaluation(evals)]
        if eval_kw:
            callbacks.append(lgb.early_stopping(cfg.patience, first_metric_only=True, verbose=False))
        model = lgb.LGBMRanker(
            objective="lambdarank", n_estimators=cfg.n_estimators, learning_rate=cfg.learning_rate,
            num_leaves=cfg.num_leaves, min_child_samples=cfg.min_child_samples, random_state=cfg.seed,
            n_jobs=cfg.n_jobs, deterministic=True, verbose=-1,
        )
        t0 = time.perf_counter()
        model.fit(x, y, group=group, feature_name=self.feature_names, callbacks=callbacks, **eval_kw)
        boost_seconds = time.perf_counter() - t0
        self.booster = model.booster_
        curve = evals.get("valid", {}).get(f"ndcg@{EVAL_AT}", [])
        # After early stopping the booster keeps only the best trees; the curve has them all.
        trained = len(curve) or self.booster.current_iteration()
        self.best_iteration = int(model.best_iteration_) if eval_kw and model.best_iteration_ else trained
        self.fit_info.update(trees_trained=trained, best_iteration=self.best_iteration,
                             early_stopped=trained < cfg.n_estimators, features_seconds=features_seconds,
                             boost_seconds=boost_seconds)

        report = FitReport(epochs=trained, best_epoch=self.best_iteration)
        report.history = [{"epoch": i + 1, f"valid_ndcg@{EVAL_AT}": float(v)} for i, v in enumerate(curve)]
        if rows.valid is not None:
            metrics = evaluate(valid.cand_offsets, valid.labels, self.score(valid))
            report.valid_metrics = {k: float(v) for k, v in metrics.items()}
        report.seconds = time.perf_counter() - started
        report.train_impressions_per_s = len(group) / report.seconds if report.seconds else 0.0
        return report

    # -- scoring ------------------------------------------------------------------------
    def score(self, impressions: Impressions) -> np.ndarray:
        """Higher is better: (T,) float64 aligned with `impressions.cand_items`."""
        if self.booster is None or not isinstance(self._builder, FeatureBuilder):
            raise PipelineError("the ranker has no model or no features: fit it, or load it with features "
                                "(or call set_features)")
        t = len(impressions.cand_items)
        out = np.empty(t, dtype=np.float64)
        # Whole impressions per chunk, so each chunk's user vectors are computed once.
        bounds = np.searchsorted(impressions.cand_offsets, np.arange(0, t, 4 * ROWS_PER_CHUNK), side="right") - 1
        cuts = np.unique(np.append(impressions.cand_offsets[bounds], t)) if t else np.array([0])
        for a, b in zip(cuts[:-1], cuts[1:]):
            x = self.features_of(impressions, np.arange(a, b))
            out[a:b] = self.booster.predict(x, num_iteration=self.best_iteration, num_threads=self.config.n_jobs)
        return out

    def importance(self) -> dict[str, float]:
        """Total gain per feature over the kept trees, largest first."""
        if self.booster is None:
            raise PipelineError("the ranker is not fitted")
        gain = self.booster.feature_importance("gain", iteration=self.best_iteration)
        pairs = sorted(zip(self.feature_names, gain.tolist()), key=lambda p: -p[1])
        return {name: float(g) for name, g in pairs}

    # -- persistence --------------------------------------------------------------------
    def save(self, folder: Path) -> list[Path]:
        if self.booster is None:
            raise PipelineError("nothing to save: the ranker is not fitted")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.booster.save_model(str(folder / MODEL_FILE), num_iteration=self.best_iteration)
        meta = {
            "format": FORMAT, "ranker": "lightgbm", "name": self.name, "config": self.config.to_dict(),
            "feature_names": self.feature_names, "best_iteration": self.best_iteration,
            "pooling": self._builder.pooling,
            "features": self.store_names, "fit_info": self.fit_info,
        }
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        np.savez(folder / CENTRES_FILE, **self._builder.centres)
        importance = {"type": "gain", "best_iteration": self.best_iteration, "importance": self.importance()}
        (folder / IMPORTANCE_FILE).write_text(json.dumps(importance, indent=2) + "\n")
        return [folder / MODEL_FILE, folder / CONFIG_FILE, folder / CENTRES_FILE, folder / IMPORTANCE_FILE]

    @classmethod
    def load(cls, folder: Path, features: Mapping[str, NewsFeatures] | None = None,
             has_cover: np.ndarray | None = None) -> LightGBMRanker:
        """A saved ranker; give `features` (or call `set_features`) before scoring."""
        import lightgbm as lgb

        folder = Path(folder)
        path = folder / CONFIG_FILE
        if not all((folder / f).is_file() for f in (CONFIG_FILE, MODEL_FILE, CENTRES_FILE)):
            raise PipelineError(f"{folder} holds no saved LightGBM ranker ({CONFIG_FILE}, {MODEL_FILE} and "
                                f"{CENTRES_FILE} expected)")
        meta = json.loads(path.read_text())
        if meta.get("format") != FORMAT:
            raise PipelineError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        ranker = cls(LGBMConfig.from_dict(meta["config"]), has_cover=has_cover)
        ranker.booster = lgb.Booster(model_file=str(folder / MODEL_FILE))
        ranker.best_iteration = int(meta["best_iteration"])
        ranker.feature_names = list(meta["feature_names"])
        ranker.fit_info = dict(meta.get("fit_info", {}))
        ranker.store_names = dict(meta.get("features", {}))
        with np.load(folder / CENTRES_FILE, allow_pickle=False) as saved:
            ranker._builder = _Trained({k: saved[k] for k in saved.files}, dict(meta["pooling"]))
        if ranker.booster.feature_name() != ranker.feature_names:
            raise PipelineError(f"{folder / MODEL_FILE}: its feature names differ from {path}'s")
        if features is not None:
            ranker.set_features(features)
        return ranker


@dataclass(frozen=True)
class _Trained:
    """What a loaded ranker knows of its features before `set_features`."""

    centres: dict[str, np.ndarray]  # role -> (D,)
    pooling: dict[str, str]  # role -> vector | mean
