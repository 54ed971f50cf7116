"""Reference rankers (random, popularity, the synthetic world's oracle) and the ranker registry.

- `RandomRanker(seed)`: uniform scores from a seeded generator; `fit` learns nothing. The
  floor: AUC 0.5 in expectation.
- `PopularityRanker()`: a news' smoothed click-through rate,
  (clicks + alpha * ctr) / (shown + alpha), counted over the labeled impressions it was fitted
  on, where `ctr` is the overall rate and alpha a prior strength in impressions. A news never
  shown in those impressions (most of a day's fresh news) gets exactly `ctr`: neither
  better nor worse than an average news, rather than last as raw click counts would put it.
  alpha is chosen on `valid` among ALPHAS (counts from train only), then the counts are
  taken over train and valid together, since valid is the most recent day and the nearest
  to what is scored. Optionally (`exposure=True`) ties, which are mostly between unseen news,
  are broken by how often a news is shown among the candidates of the impressions being
  scored (no labels are used, but it reads the scored split as a whole, so it is off by
  default).
- `OracleRanker(click_probs_path)`: the synthetic world's true click probabilities
  (`dev/click_probs.txt`), matched by impression id: the ceiling no ranker can pass.

The registry of every ranker, these included, is rankers.registry.
Letters: M impressions, T candidate rows, N news.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rankers.base import FitReport
from rankers.data import Impressions, NewsFeatures
from rankers.metrics import evaluate
from storage.atomic import save_npz, write_json
from storage.errors import PipelineError
from storage.submission import read_values

CONFIG_FILE = "config.json"
COUNTS_FILE = "popularity.npz"
ALPHAS = (1.0, 10.0, 100.0, 1000.0)
"""Prior strengths (in impressions) the popularity ranker picks from on valid."""

def _write_config(folder: Path, meta: dict) -> Path:
    """`<folder>/config.json`, written atomically (a full disk leaves no half file)."""
    return write_json(Path(folder) / CONFIG_FILE, meta)


def _read_config(folder: Path, ranker: str) -> dict:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise PipelineError(f"{folder} holds no saved ranker ({CONFIG_FILE} expected)")
    meta = json.loads(path.read_text())
    if meta.get("ranker") != ranker:
        raise PipelineError(f"{path} holds a {meta.get('ranker')!r} ranker, not {ranker!r}")
    return meta


# ----------------------------------------------------------------------------- random


class RandomRanker:
    """Uniform random scores; the same seed and impressions give the same scores."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.name = "random"

    def fit(self, train: Impressions, valid: Impressions, features: dict[str, NewsFeatures]) -> FitReport:
        report = FitReport()
        if len(valid) and valid.labeled:
            report.valid_metrics = {k: float(v) for k, v in evaluate(valid.cand_offsets, valid.labels,
                                                                     self.score(valid)).items()}
        return report

    def score(self, impressions: Impressions) -> np.ndarray:
        """(T,) float64 in [0, 1)."""
        return np.random.default_rng(self.seed).random(len(impressions.cand_items))

    def save(self, folder: Path) -> list[Path]:
        return [_write_config(folder, {"ranker": "random", "seed": self.seed})]

    @classmethod
    def load(cls, folder: Path) -> RandomRanker:
        return cls(seed=_read_config(folder, "random")["seed"])


# ----------------------------------------------------------------------------- popularity


def click_counts(impressions: Impressions, n_news: int) -> tuple[np.ndarray, np.ndarray]:
    """(N,) clicks and (N,) times shown, over the labeled candidate rows of `impressions`."""
    labeled = impressions.labels >= 0  # (T,)
    items = impressions.cand_items[labeled]
    clicks = np.bincount(items, weights=(impressions.labels[labeled] == 1), minlength=n_news)
    shown = np.bincount(items, minlength=n_news).astype(np.float64)
    return clicks, shown


class PopularityRanker:
    """Smoothed click-through rate per news (see the module docstring)."""

    def __init__(self, alpha: float | None = None, exposure: bool = False):
        if alpha is not None and alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.alpha = alpha  # None: chosen on valid among ALPHAS
        self.exposure = bool(exposure)
        self.name = "popularity"
        self.clicks: np.ndarray | None = None  # (N,)
        self.shown: np.ndarray | None = None  # (N,)

    @property
    def prior(self) -> float:
        """The overall click-through rate: what a never-shown news scores."""
        total = float(self.shown.sum())
        return float(self.clicks.sum()) / total if total else 0.0

    def fit(self, train: Impressions, valid: Impressions, features: dict[str, NewsFeatures]) -> FitReport:
        if not train.labeled:
            raise PipelineError(f"split {train.name!r} is unlabeled; popularity counts clicks")
        n = _news_count(features, train, valid)
        report = FitReport(epochs=1, best_epoch=1)
        self.clicks, self.shown = click_counts(train, n)
        useful_valid = len(valid) and valid.labeled and (valid.labels == 1).any()
        if useful_valid:
            alphas = ALPHAS if self.alpha is None else (self.alpha,)
            chosen, best = alphas[0], None
            for alpha in alphas:
                self.alpha = alpha
                metrics = evaluate(valid.cand_offsets, valid.labels, self.score(valid))
                report.history.append({"alpha": alpha, **{f"valid_{k}": float(v) for k, v in metrics.items()}})
                if best is None or metrics["auc"] > best["auc"]:
                    chosen, best = alpha, metrics
            self.alpha = chosen
            report.valid_metrics = {k: float(v) for k, v in best.items()}
            more_clicks, more_shown = click_counts(valid, n)
            self.clicks, self.shown = self.clicks + more_clicks, self.shown + more_shown
        elif self.alpha is None:
            self.alpha = ALPHAS[len(ALPHAS) // 2]
        return report

    def score(self, impressions: Impressions) -> np.ndarray:
        """(T,) float64: smoothed click-through rates, or with `exposure` the dense rank of the
        rate plus the news' share of the largest exposure (in [0, 1): only breaks ties)."""
        if self.clicks is None:
            raise PipelineError("the popularity ranker is not fitted")
        n = len(self.clicks)
        top = int(impressions.cand_items.max(initial=-1))
        if top >= n:
            raise PipelineError(f"split {impressions.name!r} refers to news row {top} but the counts cover {n} news; "
                                "fit on impressions over the same catalogue")
        rate = (self.clicks + self.alpha * self.prior) / (self.shown + self.alpha)  # (N,)
        if not self.exposure:
            return rate[impressions.cand_items]  # (T,)
        _, dense = np.unique(rate, return_inverse=True)  # (N,) equal rates, equal rank
        shown_here = np.bincount(impressions.cand_items, minlength=n)  # (N,)
        key = dense + shown_here / (int(shown_here.max(initial=0)) + 1.0)  # (N,)
        return key[impressions.cand_items].astype(np.float64)

    def save(self, folder: Path) -> list[Path]:
        if self.clicks is None:
            raise PipelineError("nothing to save: the popularity ranker is not fitted")
        # The counts before the config: a new folder that has a config.json holds a complete ranker.
        counts = save_npz(Path(folder) / COUNTS_FILE, {"clicks": self.clicks, "shown": self.shown})
        config = _write_config(folder, {"ranker": "popularity", "alpha": self.alpha, "exposure": self.exposure})
        return [config, counts]

    @classmethod
    def load(cls, folder: Path) -> PopularityRanker:
        meta = _read_config(folder, "popularity")
        ranker = cls(alpha=meta["alpha"], exposure=meta["exposure"])
        with np.load(Path(folder) / COUNTS_FILE, allow_pickle=False) as saved:
            ranker.clicks, ranker.shown = saved["clicks"], saved["shown"]
        return ranker


def _news_count(features: dict[str, NewsFeatures], *splits: Impressions) -> int:
    """N: from any feature store, else one past the largest news row the splits mention."""
    for feats in features.values():
        return int(feats.vectors.shape[0])
    top = max(max(int(s.cand_items.max(initial=-1)), int(s.hist_items.max(initial=-1))) for s in splits)
    return top + 1


# ----------------------------------------------------------------------------- oracle


class OracleRanker:
    """The synthetic world's click probabilities, read from a values file such as
    `<world>/dev/click_probs.txt`; scores only impressions that file holds."""

    def __init__(self, click_probs_path: str | Path):
        self.path = Path(click_probs_path)
        if not self.path.is_file():
            raise PipelineError(f"{self.path}: no such click-probability file; the synthetic world writes "
                                "<world>/dev/click_probs.txt")
        values = read_values(self.path)
        self._ids = values.ids
        self._offsets = values.offsets
        self._values = values.values
        self._line = {imp: i for i, imp in enumerate(values.ids)}
        self.name = "oracle"

    def fit(self, train: Impressions, valid: Impressions, features: dict[str, NewsFeatures]) -> FitReport:
        return FitReport()

    def score(self, impressions: Impressions) -> np.ndarray:
        """(T,) float64 click probabilities, matched to `impressions` by impression id."""
        lines = np.empty(len(impressions), dtype=np.int64)  # (M,) line of each impression
        for i, imp in enumerate(impressions.impression_ids):
            line = self._line.get(str(imp))
            if line is None:
                raise PipelineError(f"{self.path}: no line for impression {imp} of split {impressions.name!r}; "
                                    "the oracle scores only the split its file was written for")
            lines[i] = line
        counts = np.diff(self._offsets)[lines]  # (M,)
        wrong = np.flatnonzero(counts != impressions.candidate_counts)
        if len(wrong):
            i = int(wrong[0])
            raise PipelineError(f"{self.path}:{lines[i] + 1}: impression {impressions.impression_ids[i]} has "
                                f"{counts[i]} values but {impressions.candidate_counts[i]} candidates in split "
                                f"{impressions.name!r}; the file belongs to another world")
        starts = self._offsets[lines]  # (M,)
        rows = np.repeat(starts - impressions.cand_offsets[:-1], impressions.candidate_counts) \
            + np.arange(len(impressions.cand_items))  # (T,)
        return self._values[rows]

    def save(self, folder: Path) -> list[Path]:
        return [_write_config(folder, {"ranker": "oracle", "click_probs": str(self.path.resolve())})]

    @classmethod
    def load(cls, folder: Path) -> OracleRanker:
        return cls(_read_config(folder, "oracle")["click_probs"])


# ----------------------------------------------------------------------------- constructors
# The registry (rankers.registry) builds the baselines through these. Popularity and the
# oracle are deterministic; they take `seed` so that a flow can pass the options every
# ranker shares.


def create_random(seed: int = 0) -> RandomRanker:
    return RandomRanker(seed)


def create_popularity(alpha: float | None = None, exposure: bool = False, seed: int = 0) -> PopularityRanker:
    return PopularityRanker(alpha, exposure)


def create_oracle(click_probs_path: str | Path | None = None, *, click_probs: str | Path | None = None,
                  seed: int = 0) -> OracleRanker:
    path = click_probs_path if click_probs_path is not None else click_probs
    if path is None:
        raise PipelineError("the oracle ranker needs click_probs_path, e.g. <world>/dev/click_probs.txt")
    return OracleRanker(path)
