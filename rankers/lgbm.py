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
early stopping (dev is never seen); each tree sees a seeded share of the training impressions
(`bagging_fraction`, default 0.8, LightGBM's bagging by query), so different seeds give
different models and a comparison's seed replicates measure how much a fit owes to the
impressions it saw (with 1.0 LightGBM draws nothing at random). Impressions with no click or no non-click carry no
pairwise signal and are dropped from train and valid (counted in the ranker's `fit_info`,
also saved in config.json; FitReport.history holds valid NDCG@10 per boosting round).
Rows: `neg_fraction` keeps every click and a seeded fraction of each impression's
non-clicks (at least one); `max_rows` then caps the rows, by lowering that fraction
(`row_sampling="negatives"`, down to one non-click per impression, then dropping whole
impressions) or by keeping a seeded random set of whole impressions ("impressions").

Lambdarank runs with `lambdarank_norm=False`: LightGBM's default normalisation is why the
text-only ranker kept its first tree ("best tree = 1"). It divides each pair's |delta NDCG|
by 0.01 + |s_i - s_j|, so pairs whose scores tie or nearly tie weigh up to 100x more than the
others. After the first tree most candidates of an impression share a leaf, hence a score,
their order among themselves is only the data's order, and with features this weak (tiny
BERT's centred CLS: its cosine alone ranks valid at NDCG@10 0.272) those pairs drive the
next trees. On the mind-small synthetic world (40k train impressions drawn at random), with
text_cos as the only feature, the TRAINING NDCG@10 fell from 0.265 after tree 1 to 0.245
after tree 3 and was 0.255 after 40, the learned score no longer monotone in the cosine;
with all 68 text features the valid NDCG@10 of tree 1 (0.269) was not reached again in 60
trees, so early stopping (patience 30) kept tree 1. Without the normalisation both rise from
the first tree on (one feature: train 0.265 -> 0.266, valid 0.270 -> 0.272; all features:
valid 0.269 -> 0.273 in 40 trees), as they do with rank_xendcg or a pointwise binary
objective. tests/test_lgbm.py shows the same on a one-feature toy with MIND-like impression
sizes. The features themselves were sound: the centring, the `present`-masked user means,
labels and groups (one group per impression, rows in impression order) checked out, and
text_cos and text_dot alone give valid AUC 0.570 and 0.569; the Hadamard coordinates add
little on these tiny-BERT vectors (the fitted model: valid AUC 0.574, the cosine alone 0.570).

Memory: the training matrix is never built whole. LightGBM bins the features of a seeded
sample of BIN_SAMPLE rows (its own default sample size), then pulls the rows block by block
from a `lightgbm.Sequence` and keeps only the binned values (one byte per feature per row),
so the peak stays near the binned data. Features are computed for blocks of rows, each
block computing its impressions' user vectors once; scoring goes through whole impressions
SCORE_ROWS rows at a time. `n_jobs` (default -1: all the machine's cores) threads boost and
predict.

Saved as `model.txt` (LightGBM's text format), `config.json` (hyperparameters, feature
names, what fitting did), `centres.npz` (the per-role centres, so a loaded model builds
the same features) and `importance.json` (gain per feature, largest first).
Letters: M impressions, T candidate rows, N news, H history, D width, F features.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from rankers.base import ROLES, FitReport, check_fields
from rankers.data import HISTORY, Impressions, NewsFeatures
from rankers.metrics import evaluate
from storage import atomic
from storage.errors import PipelineError

MODEL_FILE = "model.txt"
CONFIG_FILE = "config.json"
IMPORTANCE_FILE = "importance.json"
CENTRES_FILE = "centres.npz"
FORMAT = "mmnews-lightgbm-v1"
ROWS_PER_CHUNK = 1 << 16
"""Candidate rows whose features are built at once (and LightGBM's Sequence batch): bounds the temporaries."""
SCORE_ROWS = 1 << 18
"""Candidate rows (whole impressions) scored at once."""
GATHER_FLOATS = 1 << 24
"""History vectors gathered at once for user means (64 MB of float32)."""
BIN_SAMPLE = 200_000
"""Rows whose features set LightGBM's bin boundaries (LightGBM's bin_construct_sample_cnt)."""
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
    """Features and hyperparameters.

    Rows: `neg_fraction` 1.0 keeps every non-click; `max_rows` None trains on every row
    left, else at most that many, chosen by `row_sampling` (module docstring); the valid
    split is then also cut to at most `max_rows` rows of whole impressions. The default cap
    costs nothing measurable on the mind-small synthetic world's text features (4.8M useful
    train rows; dev AUC 0.5734 / NDCG@10 0.2741 with all rows, 0.5739 / 0.2746 with 1M
    rows of fewer non-clicks, 0.5739 / 0.2738 with 0.5M, 0.5706 / 0.2708 with 1M rows of
    whole impressions) and makes the fit 3x to 5x faster (benchmarks/RESULTS.md).
    """

    sources: tuple[str, ...] = ("text",)
    fuse: Literal["none", "hadamard"] = "hadamard"  # only used when text and image are both sources
    pooling: Literal["auto", "vector", "mean"] = "auto"  # auto: token mean where the store has tokens
    history: int = HISTORY
    cover_feature: bool | None = None  # None: has_cover where cover flags are known
    n_estimators: int = 500  # boosting rounds at most (the text features stop near 90)
    patience: int = 30  # boosting rounds without a better valid NDCG@10 before stopping
    learning_rate: float = 0.1
    num_leaves: int = 31
    min_child_samples: int = 20
    neg_fraction: float = 1.0  # in (0, 1]
    max_rows: int | None = 1_000_000  # None: no cap; else >= 2
    row_sampling: Literal["negatives", "impressions"] = "negatives"
    # Each tree sees a seeded share of the training impressions (LightGBM's bagging by query).
    # Without it LightGBM draws nothing at random: every training seed gave the same model, so
    # a comparison's seed replicates measured nothing and its intervals ignored how much one
    # fit owes to the impressions it happened to see. 1.0: no bagging, the deterministic fit.
    bagging_fraction: float = 0.8  # in (0, 1]
    seed: int = 0
    # Threads for boosting and prediction; -1 all the machine's cores, -2 all but one (as
    # joblib). On the shared 2-core machines, with OMP_WAIT_POLICY=PASSIVE (the Makefile's),
    # 2 threads boosted 1.0x to 1.35x as fast as 1; with spinning OpenMP threads (the policy
    # unset) 2x as fast while the other core was idle and 2-3x SLOWER once it was busy
    # (benchmarks/RESULTS.md): set PASSIVE wherever the cores are shared.
    n_jobs: int = -1

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
            "max_rows": self.max_rows is None or self.max_rows >= 2,
            "row_sampling": self.row_sampling in ("negatives", "impressions"),
            "bagging_fraction": 0.0 < self.bagging_fraction <= 1.0,
            "n_jobs": self.n_jobs != 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid LGBMConfig {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)} "
                             "(fuse is 'none' or 'hadamard'; pooling 'auto', 'vector' or 'mean'; "
                             "neg_fraction and bagging_fraction in (0, 1]; max_rows None or at least 2; row_sampling "
                             "'negatives' or 'impressions'; n_jobs a thread count or negative for all cores)")

    @property
    def fused(self) -> bool:
        return self.fuse == "hadamard" and "text" in self.sources and "image" in self.sources

    @property
    def threads(self) -> int:
        """`n_jobs` as a thread count on this machine."""
        if self.n_jobs > 0:
            return self.n_jobs
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores + 1 + self.n_jobs)

    def booster_params(self) -> dict[str, Any]:
        """LightGBM's parameters for training (rankers.lgbm_dask passes the same ones)."""
        params = {
            "objective": "lambdarank", "lambdarank_norm": False,  # see the module docstring
            "metric": "ndcg", "eval_at": [EVAL_AT], "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves, "min_child_samples": self.min_child_samples, "seed": self.seed,
            "num_threads": self.threads, "deterministic": True, "verbose": -1,
        }
        if self.bagging_fraction < 1.0:  # whole impressions, a new draw for every tree, from the seed
            params.update(bagging_fraction=self.bagging_fraction, bagging_freq=1, bagging_by_query=True,
                          bagging_seed=self.seed)
        return params

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


def history_rows(impressions: Impressions, imps: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The most recent `max_len` clicks of impressions `imps` (m,), as Impressions.histories
    gives them for all M (rows (m, H') int64 padded with 0, mask (m, H') bool), in O(m H)."""
    ends = impressions.hist_offsets[imps + 1]  # (m,)
    lengths = np.minimum(ends - impressions.hist_offsets[imps], max_len)  # (m,)
    width = max(int(lengths.max(initial=0)), 1)
    mask = np.arange(width)[None, :] < lengths[:, None]  # (m, H')
    take = ((ends - lengths)[:, None] + np.arange(width)[None, :])[mask]
    rows = np.zeros(mask.shape, dtype=np.int64)
    rows[mask] = impressions.hist_items[take]
    return rows, mask


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


def row_impressions(impressions: Impressions, rows: np.ndarray) -> np.ndarray:
    """(t,) the impression of each candidate row of `rows` (t,)."""
    return np.searchsorted(impressions.cand_offsets, rows, side="right") - 1


def impression_chunks(imp: np.ndarray, size: int) -> Iterator[tuple[int, int]]:
    """Cut rows whose impressions `imp` (T',) are sorted into spans [a, b) of about `size`
    rows that never split an impression (an impression longer than `size` is one span)."""
    a, n = 0, len(imp)
    while a < n:
        b = min(a + size, n)
        if b < n:
            b = int(np.searchsorted(imp, imp[b - 1], side="right"))
        yield a, b
        a = b


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
    """(N, D) float32 news vectors: the store's vectors, or the masked mean of its tokens
    (read in chunks, so a float16 or memory-mapped token array is never copied whole)."""
    if pooling == "vector":
        return np.asarray(feats.vectors, dtype=np.float32)
    n, length, d = feats.tokens.shape
    out = np.zeros((n, d), dtype=np.float32)
    step = max(1, GATHER_FLOATS // max(length * d, 1))
    for a in range(0, n, step):
        w = np.asarray(feats.mask[a:a + step], dtype=np.float32)  # (n, L)
        tokens = np.asarray(feats.tokens[a:a + step], dtype=np.float32)  # (n, L, D)
        total = np.einsum("nl,nld->nd", w, tokens, dtype=np.float32)  # (n, D)
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

    def check(self, impressions: Impressions) -> None:
        """Refuse impressions that refer to news beyond the features' N."""
        top = max(int(impressions.cand_items.max(initial=-1)), int(impressions.hist_items.max(initial=-1)))
        if top >= self.n_news:
            raise PipelineError(f"split {impressions.name!r} refers to news row {top} but the features hold "
                                f"{self.n_news} news; use stores extracted from the same catalogue")

    def matrix(self, impressions: Impressions, rows: np.ndarray | None = None) -> np.ndarray:
        """(T', F) float32 features of candidate rows `rows` (sorted indices; default all T),
        built ROWS_PER_CHUNK rows (whole impressions) at a time."""
        self.check(impressions)
        rows = np.arange(len(impressions.cand_items)) if rows is None else np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), len(self.names)), dtype=np.float32)  # (T', F)
        for a, b in impression_chunks(row_impressions(impressions, rows), ROWS_PER_CHUNK):
            self.block(impressions, rows[a:b], out=out[a:b])
        return out

    def block(self, impressions: Impressions, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(t, F) float32 features of candidate rows `rows` (t,), sorted; the user vectors of
        the impressions they touch are computed once. No range check (see `check`)."""
        cfg, tables = self.config, self.tables
        imp = row_impressions(impressions, rows)  # (t,) sorted
        starts = np.flatnonzero(np.diff(imp, prepend=-1))  # first row of each touched impression
        imps = imp[starts]  # (m,)
        local = np.cumsum(np.diff(imp, prepend=imp[:1]) != 0)  # (t,) index into imps
        hist_rows, hist_mask = history_rows(impressions, imps, cfg.history)  # (m, H')
        users = {name: user_vectors(hist_rows, hist_mask, vec, present) for name, (vec, present) in tables.items()}
        user_norm = {name: np.linalg.norm(u, axis=1)[local] for name, u in users.items()}  # (t,)
        cand = impressions.cand_items[rows]  # (t,)

        out = np.empty((len(rows), len(self.names)), dtype=np.float32) if out is None else out  # (t, F)
        col = 0
        for role in cfg.sources:
            d = self.dims[role]
            block = out[:, col:col + d]
            np.multiply(users[role][local], tables[role][0][cand], out=block)  # (t, D)
            dot = block.sum(axis=1)  # (t,)
            out[:, col + d] = dot
            out[:, col + d + 1] = _cosine(dot, user_norm[role], self.news_norm[role][cand])
            col += d + 2
        if cfg.fused:
            dot = np.einsum("td,td->t", users["fused"][local], tables["fused"][0][cand], dtype=np.float32)
            out[:, col] = dot
            out[:, col + 1] = _cosine(dot, user_norm["fused"], self.news_norm["fused"][cand])
            col += 2
        out[:, col] = (impressions.hist_offsets[imp + 1] - impressions.hist_offsets[imp]).astype(np.float32)
        col += 1
        if self.cover:
            out[:, col] = self.has_cover[cand]
            col += 1
        out[:, col] = (impressions.cand_offsets[imp + 1] - impressions.cand_offsets[imp]).astype(np.float32)
        return out


class FeatureRows:
    """The feature rows `rows` (sorted) of `impressions` as a `lightgbm.Sequence` (registered
    as one on first use): LightGBM reads them block by block, so they are never all in memory."""

    batch_size = ROWS_PER_CHUNK

    def __init__(self, builder: FeatureBuilder, impressions: Impressions, rows: np.ndarray):
        builder.check(impressions)
        self.builder, self.impressions, self.rows = builder, impressions, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int | slice) -> np.ndarray:
        if isinstance(idx, slice):
            return self.builder.block(self.impressions, self.rows[idx])  # (t, F)
        return self.builder.block(self.impressions, self.rows[idx:idx + 1 or None])[0]  # (F,)


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
    non-clicks (at least one where there are any), chosen uniformly by a seeded generator.
    With one seed, a smaller fraction keeps a subset of what a larger one keeps."""
    t = len(labels)
    if fraction >= 1.0:
        return np.ones(t, dtype=bool)
    imp = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))  # (T,)
    neg = labels == 0
    quota = _negative_quota(np.bincount(imp[neg], minlength=len(offsets) - 1), fraction)  # (M,)
    # Rank each non-click within its impression by a random key; keep the first `quota`.
    key = np.random.default_rng(seed).random(t)
    order = np.lexsort((key, ~neg, imp))  # by impression, non-clicks first, then key
    start = np.searchsorted(imp[order], imp[order], side="left")  # first slot of its impression
    rank = np.empty(t, dtype=np.int64)
    rank[order] = np.arange(t) - start
    return ~neg | (rank < quota[imp])


def _negative_quota(n_neg: np.ndarray, fraction: float) -> np.ndarray:
    """(M,) non-clicks kept per impression out of n_neg (M,): ceil(fraction * n), at least 1."""
    return np.where(n_neg > 0, np.maximum(1, np.ceil(fraction * n_neg)), 0).astype(np.int64)


def cap_rows(offsets: np.ndarray, labels: np.ndarray, config: LGBMConfig,
             keep: np.ndarray | None = None) -> np.ndarray:
    """(T,) bool rows to train on: `subsample_negatives` at `config.neg_fraction` (or `keep`,
    what it gave), then at most `config.max_rows` of them (see LGBMConfig.row_sampling), all
    seeded by `config.seed`.

    `negatives`: the largest fraction <= neg_fraction whose rows fit (bisection; every click
    and at least one non-click per impression stay), then, if one non-click per impression
    is still too many, whole impressions are dropped as with `impressions`, which keeps a
    seeded random set of whole impressions whose rows fit. At least one impression stays.
    """
    m = len(offsets) - 1
    imp = np.repeat(np.arange(m), np.diff(offsets))  # (T,)
    fraction = config.neg_fraction
    if keep is None:
        keep = subsample_negatives(offsets, labels, fraction, config.seed)
    cap = config.max_rows
    if cap is None or keep.sum() <= cap:
        return keep
    if config.row_sampling == "negatives":
        clicks = int(np.count_nonzero(labels != 0))
        n_neg = np.bincount(imp[labels == 0], minlength=m)  # (M,)
        low, high = 0.0, fraction  # rows(low) may exceed the cap only at its floor of one non-click
        for _ in range(50):
            mid = (low + high) / 2
            if clicks + _negative_quota(n_neg, mid).sum() <= cap:
                low = mid
            else:
                high = mid
        keep = subsample_negatives(offsets, labels, max(low, 1e-12), config.seed)
        if keep.sum() <= cap:
            return keep
    chosen = whole_impressions(np.bincount(imp[keep], minlength=m), cap, config.seed)  # (M,)
    return keep & chosen[imp]


def whole_impressions(counts: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """(M,) bool: a seeded random set of impressions whose `counts` (M,) rows sum to at most
    `cap` (the first impressions of a seeded shuffle; at least one)."""
    order = np.random.default_rng([seed, 1]).permutation(len(counts))
    fits = np.cumsum(counts[order]) <= cap  # a prefix of the shuffled impressions
    fits[:1] = True
    chosen = np.zeros(len(counts), dtype=bool)
    chosen[order[fits]] = True
    return chosen


@dataclass(frozen=True)
class TrainingRows:
    """The rows lambdarank learns from, in impression order (T' train rows, V valid rows);
    their features are built on demand (`features`, `dataset`), never all at once."""

    builder: FeatureBuilder
    train: Impressions  # the train impressions that keep rows (with a click and a non-click)
    rows: np.ndarray  # (T',) their candidate rows kept, sorted
    y: np.ndarray  # (T',) int8 labels
    group: np.ndarray  # (M',) rows per train impression, in row order, all > 0
    valid: Impressions | None  # the valid impressions with a click and a non-click, if any

    def features(self, a: int = 0, b: int | None = None) -> np.ndarray:
        """(b - a, F) float32 features of train rows a..b."""
        return self.builder.matrix(self.train, self.rows[a:b])

    @property
    def x(self) -> np.ndarray:
        """(T', F) all train features at once (for small data and tests)."""
        return self.features()

    @property
    def valid_x(self) -> np.ndarray | None:
        """(V, F) the valid features, built on each call."""
        return None if self.valid is None else self.builder.matrix(self.valid)

    def datasets(self, params: Mapping[str, Any]) -> tuple[Any, Any]:
        """(train, valid or None) lightgbm.Datasets, binned from the features of a seeded
        sample of BIN_SAMPLE train rows and then filled block by block."""
        import lightgbm as lgb

        lgb.Sequence.register(FeatureRows)
        t = len(self.rows)
        pick = np.arange(t)
        if t > BIN_SAMPLE:
            pick = np.sort(np.random.default_rng([int(params.get("seed", 0)), 2]).choice(t, BIN_SAMPLE, replace=False))
        reference = lgb.Dataset(self.features_at(pick), params=dict(params), feature_name=self.builder.names)
        reference.construct()
        train = lgb.Dataset(FeatureRows(self.builder, self.train, self.rows), label=self.y, group=self.group,
                            reference=reference, params=dict(params), feature_name=self.builder.names)
        train.construct()
        valid = None
        if self.valid is not None:
            valid = lgb.Dataset(FeatureRows(self.builder, self.valid, np.arange(len(self.valid.cand_items))),
                                label=self.valid.labels, group=self.valid.candidate_counts, reference=train,
                                params=dict(params), feature_name=self.builder.names)
            valid.construct()
        return train, valid

    def features_at(self, picks: np.ndarray) -> np.ndarray:
        """(p, F) features of train rows at sorted positions `picks` (p,)."""
        return self.builder.matrix(self.train, self.rows[picks])


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
        """Attach `features` (new centres) and choose the rows lambdarank learns from; sets
        `fit_info`. Shared by `fit` and rankers.lgbm_dask, so both train on exactly the same rows."""
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
        before = subsample_negatives(fit_train.cand_offsets, fit_train.labels, cfg.neg_fraction, cfg.seed)  # (T,)
        keep = cap_rows(fit_train.cand_offsets, fit_train.labels, cfg, before)  # (T,)
        kept = np.bincount(row_impressions(fit_train, np.flatnonzero(keep)), minlength=len(fit_train)) > 0  # (M,)
        if not kept.all():  # the cap dropped whole impressions
            keep = keep[kept[fit_train.row_impression]]
            fit_train = fit_train.select(kept, "train")
        rows = np.flatnonzero(keep)  # (T',)
        group = np.bincount(row_impressions(fit_train, rows), minlength=len(fit_train))  # (M',)

        fit_valid = None
        valid_useful = useful_impressions(valid) if len(valid) and valid.labeled else np.zeros(len(valid), bool)
        if cfg.max_rows is not None and valid.candidate_counts[valid_useful].sum() > cfg.max_rows:
            # Early stopping needs whole impressions: at most max_rows rows of them.
            valid_useful &= whole_impressions(np.where(valid_useful, valid.candidate_counts, 0), cfg.max_rows, cfg.seed)
        if valid_useful.any():
            fit_valid = valid.select(valid_useful, "valid")
        self.fit_info = {
            "train_impressions": len(train),
            "train_impressions_used": len(fit_train),
            "train_dropped_no_click": int(np.count_nonzero(clicks == 0)),
            "train_dropped_no_nonclick": int(np.count_nonzero(~useful & (clicks > 0))),
            "train_impressions_capped": int(np.count_nonzero(~kept)),
            "train_rows": len(rows),
            "train_negatives_dropped": int(np.count_nonzero(fit_train.labels[~keep] == 0)) if len(keep) else 0,
            "train_rows_capped": int(before.sum()) - len(rows),
            "valid_impressions": len(valid),
            "valid_impressions_used": int(np.count_nonzero(valid_useful)),
            "features": len(self.feature_names),
        }
        return TrainingRows(self._builder, fit_train, rows, fit_train.labels[rows], group, fit_valid)

    def fit(self, train: Impressions, valid: Impressions, features: dict[str, NewsFeatures]) -> FitReport:
        import lightgbm as lgb

        cfg = self.config
        started = time.perf_counter()
        rows = self.training_rows(train, valid, features)
        params = cfg.booster_params()
        train_set, valid_set = rows.datasets(params)
        features_seconds = time.perf_counter() - started

        evals: dict[str, dict[str, list[float]]] = {}
        callbacks = [lgb.record_evaluation(evals)]
        if valid_set is not None:
            callbacks.append(lgb.early_stopping(cfg.patience, first_metric_only=True, verbose=False))
        t0 = time.perf_counter()
        self.booster = lgb.train(params, train_set, num_boost_round=cfg.n_estimators,
                                 valid_sets=[valid_set] if valid_set is not None else [],
                                 valid_names=["valid"] if valid_set is not None else [], callbacks=callbacks)
        boost_seconds = time.perf_counter() - t0
        del train_set, valid_set
        curve = evals.get("valid", {}).get(f"ndcg@{EVAL_AT}", [])
        trained = len(curve) or self.booster.current_iteration()
        self.best_iteration = int(self.booster.best_iteration or trained) if rows.valid is not None else trained
        self.fit_info.update(trees_trained=trained, best_iteration=self.best_iteration,
                             early_stopped=trained < cfg.n_estimators, threads=cfg.threads,
                             features_seconds=features_seconds, boost_seconds=boost_seconds)

        report = FitReport(epochs=trained, best_epoch=self.best_iteration)
        report.history = [{"epoch": i + 1, f"valid_ndcg@{EVAL_AT}": float(v)} for i, v in enumerate(curve)]
        if rows.valid is not None:
            metrics = evaluate(valid.cand_offsets, valid.labels, self.score(valid))
            report.valid_metrics = {k: float(v) for k, v in metrics.items()}
        report.seconds = time.perf_counter() - started
        report.train_impressions_per_s = len(rows.group) / report.seconds if report.seconds else 0.0
        return report

    # -- scoring ------------------------------------------------------------------------
    def score(self, impressions: Impressions) -> np.ndarray:
        """Higher is better: (T,) float64 aligned with `impressions.cand_items`."""
        if self.booster is None or not isinstance(self._builder, FeatureBuilder):
            raise PipelineError("the ranker has no model or no features: fit it, or load it with features "
                                "(or call set_features)")
        builder = self._builder
        builder.check(impressions)
        t = len(impressions.cand_items)
        out = np.empty(t, dtype=np.float64)
        rows = np.arange(t)
        # Whole impressions per chunk: each impression's user vectors are computed once.
        for a, b in impression_chunks(row_impressions(impressions, rows), SCORE_ROWS):
            x = builder.block(impressions, rows[a:b])  # (b - a, F)
            out[a:b] = self.booster.predict(x, num_iteration=self.best_iteration, num_threads=self.config.threads)
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
        # Written by us, not by LightGBM's C++ writer: on a full disk that prints its own
        # "[Fatal]" line and can leave a truncated model.txt (storage/atomic.py).
        atomic.write_text(folder / MODEL_FILE, self.booster.model_to_string(num_iteration=self.best_iteration))
        meta = {
            "format": FORMAT, "ranker": "lightgbm", "name": self.name, "config": self.config.to_dict(),
            "feature_names": self.feature_names, "best_iteration": self.best_iteration,
            "pooling": self._builder.pooling,
            "features": self.store_names, "fit_info": self.fit_info,
        }
        atomic.write_json(folder / CONFIG_FILE, meta)
        atomic.save_npz(folder / CENTRES_FILE, self._builder.centres)
        importance = {"type": "gain", "best_iteration": self.best_iteration, "importance": self.importance()}
        atomic.write_json(folder / IMPORTANCE_FILE, importance, sort_keys=False)
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
