"""The LightGBM lambdarank ranker with its boosting on a Dask cluster (`lightgbm.DaskLGBMRanker`).

Everything but the boosting is rankers.lgbm's: the same feature rows (`training_rows`), the
same scoring, saving and loading. A model trained here is saved in the local format and
loads with `LightGBMRanker.load`.

- Partitions hold whole impressions. Lambdarank's gradients compare candidates within one
  impression, so an impression split across workers would lose pairs. The train rows are cut
  into `partitions` contiguous blocks of impressions with about equal row counts (default:
  one per worker). Each block's rows, labels and group sizes are scattered together to one
  worker, round robin, so chunk k of the group array holds exactly the impressions of row
  chunk k.
- Training is data-parallel (`tree_learner="data"`): each worker builds histograms of its
  own rows, and they are summed for every split. The trees follow the local ones closely
  but not exactly. Before training, each worker sets the bin boundaries for its share of
  the features from its own rows only, and which worker LightGBM ranks first (and so which
  features it bins) can change from one fit to the next. Two Dask fits of the same data
  can therefore differ slightly. With one partition, a single worker trains, and the model
  equals the local one tree for tree.
- DaskLGBMRanker has no early stopping. All `n_estimators` rounds are trained. The valid
  NDCG@10 is then replayed round by round on the client with LightGBM's early-stopping rule
  (stop `patience` rounds after the best one), and the model keeps that best round, as the
  local ranker does.

Letters: M impressions, T candidate rows, V valid rows, F features, P partitions.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rankers.base import FitReport
from rankers.data import Impressions, NewsFeatures
from rankers.lgbm import EVAL_AT, LGBMConfig, LightGBMRanker, TrainingRows
from rankers.metrics import evaluate, per_impression
from storage.errors import PipelineError


def impression_partitions(group: np.ndarray, parts: int) -> tuple[np.ndarray, np.ndarray]:
    """(row chunks, impression chunks), (P,) each: min(parts, M) contiguous, non-empty blocks
    of whole impressions with about equal rows. group: (M,) rows per impression, all positive."""
    ends_at = np.cumsum(group)  # (M,) rows up to and including each impression
    m = len(group)
    if m == 0 or ends_at[-1] == 0:
        raise PipelineError("no training rows to partition")
    parts = max(1, min(int(parts), m))
    cuts = []  # block k ends after cuts[k] impressions
    for k in range(1, parts):
        target = ends_at[-1] * k / parts
        j = int(np.searchsorted(ends_at, target))  # the first impression reaching the target
        # End the block before or after impression j, whichever lands nearer the target...
        cut = j if j > 0 and target - ends_at[j - 1] <= ends_at[j] - target else j + 1
        # ...leaving at least one impression to this block and to each one after it.
        cuts.append(min(max(cut, (cuts[-1] if cuts else 0) + 1), m - (parts - k)))
    ends = np.array([*cuts, m])  # (P,) exclusive impression ends
    starts = np.append(0, ends[:-1])
    row_chunks = ends_at[ends - 1] - np.append(0, ends_at[ends[:-1] - 1])
    return row_chunks.astype(np.int64), (ends - starts).astype(np.int64)


def replay_early_stopping(booster: Any, valid: Impressions, valid_x: np.ndarray, patience: int) -> tuple[list[float], int]:
    """(curve, best round): valid NDCG@10 after each boosting round of `booster`, up to where
    LightGBM's early stopping would have stopped, and the 1-based round it would keep.

    Scores grow one tree at a time, so the replay costs one pass over the trees. With binary
    labels this NDCG@10 is LightGBM's `ndcg@10`: the same gains and discounts, and ties
    ordered by position.
    """
    scores = np.zeros(len(valid_x), dtype=np.float64)  # (V,)
    curve: list[float] = []
    best, best_round = -np.inf, 0
    for i in range(booster.current_iteration()):
        scores += booster.predict(valid_x, start_iteration=i, num_iteration=1, raw_score=True)
        per = per_impression(valid.cand_offsets, valid.labels, scores)
        curve.append(float(per.ndcg10[per.valid].mean()))
        if curve[-1] > best:
            best, best_round = curve[-1], i
        elif i - best_round >= patience:
            break
    return curve, best_round + 1


class DaskLightGBMRanker(LightGBMRanker):
    """LightGBMRanker trained with `lightgbm.DaskLGBMRanker` on the cluster of `client`.

    `DaskLightGBMRanker(client, config=None, *, partitions=None, fusion=None, has_cover=None,
    **options)`. The options are those of LightGBMRanker. `partitions` defaults to one per
    worker. `n_jobs` does not apply here: each worker uses its own thread count. After
    `fit`, the model is a local booster (`DaskLGBMRanker.to_local()`), so `score`, `save`
    and `LightGBMRanker.load` work as for the local ranker.
    """

    def __init__(self, client: Any, config: LGBMConfig | None = None, *, partitions: int | None = None,
                 fusion: str | None = None, has_cover: np.ndarray | None = None, **options: Any):
        super().__init__(config, fusion=fusion, has_cover=has_cover, **options)
        if partitions is not None and partitions < 1:
            raise PipelineError(f"partitions={partitions}: give at least 1, or leave it unset for one per worker")
        self.client = client
        self.partitions = partitions

    def fit(self, train: Impressions, valid: Impressions, features: Mapping[str, NewsFeatures]) -> FitReport:
        import lightgbm as lgb

        cfg = self.config
        started = time.perf_counter()
        workers = sorted(self.client.ncores())
        if not workers:
            raise PipelineError("the Dask cluster has no workers; start some, or train with LightGBMRanker")
        rows = self.training_rows(train, valid, features)
        row_chunks, imp_chunks = impression_partitions(rows.group, self.partitions or len(workers))
        x, y, group = scatter_partitions(self.client, rows, row_chunks, imp_chunks, workers)
        features_seconds = time.perf_counter() - started

        # The local ranker's parameters, less what the Dask estimator sets itself.
        params = {k: v for k, v in cfg.booster_params().items() if k not in ("num_threads", "metric", "eval_at")}
        model = lgb.DaskLGBMRanker(client=self.client, tree_learner="data", n_estimators=cfg.n_estimators, **params)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            # get_params() always holds n_jobs, and lightgbm.dask warns that it drops it.
            warnings.filterwarnings("ignore", message="Parameter n_jobs will be ignored", category=UserWarning)
            model.fit(x, y, group=group, feature_name=self.feature_names)
        boost_seconds = time.perf_counter() - t0
        self.booster = model.to_local().booster_
        trained = self.booster.current_iteration()
        curve: list[float] = []
        self.best_iteration = trained
        if rows.valid is not None:
            valid_x = rows.valid_x  # (V, F)
            curve, self.best_iteration = replay_early_stopping(self.booster, rows.valid, valid_x, cfg.patience)
            del valid_x
        self.fit_info.update(
            trees_trained=trained, best_iteration=self.best_iteration, early_stopped=len(curve) < trained,
            features_seconds=features_seconds, boost_seconds=boost_seconds, dask_workers=min(len(workers), len(row_chunks)),
            dask_partitions=len(row_chunks),
        )

        report = FitReport(epochs=trained, best_epoch=self.best_iteration)
        report.history = [{"epoch": i + 1, f"valid_ndcg@{EVAL_AT}": v} for i, v in enumerate(curve)]
        if rows.valid is not None:
            metrics = evaluate(valid.cand_offsets, valid.labels, self.score(valid))
            report.valid_metrics = {k: float(v) for k, v in metrics.items()}
        report.seconds = time.perf_counter() - started
        report.train_impressions_per_s = len(rows.group) / report.seconds if report.seconds else 0.0
        return report


def scatter_partitions(client: Any, rows: TrainingRows, row_chunks: np.ndarray, imp_chunks: np.ndarray,
                       workers: Sequence[str]) -> tuple[Any, Any, Any]:
    """Dask arrays x (T, F), y (T,), group (M,) whose chunk k is block k, held by worker k mod W.
    Each block's features are built just before it is sent: the client never holds them all."""
    import dask.array as da

    xs, ys, gs = [], [], []
    a = g = 0
    for k, (n, m) in enumerate(zip(row_chunks.tolist(), imp_chunks.tolist())):
        parts = [rows.features(a, a + n), rows.y[a:a + n], rows.group[g:g + m]]
        fx, fy, fg = client.scatter(parts, workers=[workers[k % len(workers)]], hash=False)
        xs.append(da.from_delayed(fx, shape=(n, len(rows.builder.names)), dtype=np.float32))
        ys.append(da.from_delayed(fy, shape=(n,), dtype=rows.y.dtype))
        gs.append(da.from_delayed(fg, shape=(m,), dtype=rows.group.dtype))
        a, g = a + n, g + m
    return da.concatenate(xs), da.concatenate(ys), da.concatenate(gs)
