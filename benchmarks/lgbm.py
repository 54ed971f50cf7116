"""Benchmark the LightGBM ranker at MIND-small shape on synthetic features.

    .venv/bin/python benchmarks/lgbm.py [--impressions 156965] [--sample 10000] [--dim 64]
                                        [--trees 30] [--loop-rows 2000] [--seed 0]

Builds MIND-small-shaped impressions (156,965 by default, about 37 candidates each: 5.8M
rows, histories about 33 clicks over 65,238 news) with random text and image vectors of
width --dim, 44% of news with a cover, and clicks planted on the user-candidate text
cosine and the cover (about 5% of rows, at least one per impression) so the trees have something to
learn. The full 5.8M x F matrix is too much for the 2-core development machines, so
training uses --sample impressions (the rows, features and rows/s are printed; rows/s
scale roughly linearly) and 20% of them as the validation split. It times, in one run:
- building the feature matrix (text + image, hadamard fusion: F = 2 (D + 2) + 5) vectorised
  against a plain per-row Python loop over --loop-rows rows (extrapolated to all rows), and
  checks that both give the same values;
- fitting --trees boosting rounds (early stopping cannot end them sooner) with all negatives,
  with negative subsampling (20% of non-clicks), and with 2 threads instead of 1;
- scoring all sampled rows with the fitted model.
It prints the machine and a table.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import replace

import numpy as np

from rankers.data import Impressions, NewsFeatures
from rankers.lgbm import FeatureBuilder, LGBMConfig, LightGBMRanker, resolve_cover

NEWS = 65_238


def make_world(m: int, dim: int, seed: int) -> tuple[Impressions, dict[str, NewsFeatures]]:
    """MIND-small-shaped impressions and two (N, D) feature stores; labels planted on text."""
    rng = np.random.default_rng(seed)
    cover = rng.random(NEWS) < 0.44  # (N,)
    text = rng.standard_normal((NEWS, dim)).astype(np.float32)
    image = rng.standard_normal((NEWS, dim)).astype(np.float32)
    features = {
        "text": NewsFeatures("text", "text", text, np.ones(NEWS, dtype=bool)),
        "image": NewsFeatures("image", "image", image, cover),
    }
    cands = np.clip(rng.lognormal(np.log(30), 0.7, m).astype(np.int64), 5, 300)  # (M,)
    hists = np.clip(rng.lognormal(np.log(25), 0.8, m).astype(np.int64), 0, 500)  # (M,)
    cand_offsets = np.concatenate([[0], np.cumsum(cands)])
    hist_offsets = np.concatenate([[0], np.cumsum(hists)])
    imps = Impressions(
        name="bench", impression_ids=np.arange(1, m + 1), user_ids=np.array([f"U{i % 50_000}" for i in range(m)],
                                                                             dtype=object),
        times=np.arange(m, dtype=np.int64), hist_offsets=hist_offsets,
        hist_items=rng.integers(0, NEWS, hist_offsets[-1]), cand_offsets=cand_offsets,
        cand_items=rng.integers(0, NEWS, cand_offsets[-1]), labels=np.zeros(cand_offsets[-1], dtype=np.int8),
    )
    # Clicks from the text cosine the ranker will see: logistic, then one forced per impression.
    config = LGBMConfig(sources=("text",), pooling="vector", cover_feature=False)
    builder = FeatureBuilder(config, features)
    cos = np.concatenate([builder.matrix(imps, np.arange(a, min(a + 1_000_000, len(imps.cand_items))))[:, dim + 1]
                          for a in range(0, len(imps.cand_items), 1_000_000)])
    p = 1.0 / (1.0 + np.exp(-(-4.4 + 8.0 * cos + 0.8 * cover[imps.cand_items])))
    labels = (rng.random(len(p)) < p).astype(np.int8)
    labels[rng.integers(cand_offsets[:-1], cand_offsets[1:])] = 1
    return replace(imps, labels=labels), features


def per_row_loop(imps: Impressions, builder: FeatureBuilder, rows: np.ndarray) -> np.ndarray:
    """The plain way: every row averages its user's history and compares, one at a time."""
    cfg = builder.config
    out = np.empty((len(rows), len(builder.names)), dtype=np.float32)
    for k, row in enumerate(rows):
        i = int(np.searchsorted(imps.cand_offsets, row, side="right") - 1)
        history = imps.hist_items[imps.hist_offsets[i]:imps.hist_offsets[i + 1]][-cfg.history:]
        cand = imps.cand_items[row]
        feats: list[float] = []
        for name in [*cfg.sources, *(["fused"] if cfg.fused else [])]:
            vectors, present = builder.tables[name]
            used = [vectors[h] for h in history if present[h]]
            u = np.mean(used, axis=0) if used else np.zeros(vectors.shape[1], dtype=np.float32)
            c = vectors[cand]
            if name != "fused":
                feats.extend(u * c)
            dot = float(u @ c)
            norms = float(np.linalg.norm(u) * np.linalg.norm(c))
            feats += [dot, dot / norms if norms > 0 else 0.0]
        feats += [len(imps.hist_items[imps.hist_offsets[i]:imps.hist_offsets[i + 1]]), float(builder.has_cover[cand]),
                  imps.cand_offsets[i + 1] - imps.cand_offsets[i]]
        out[k] = feats
    return out


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impressions", type=int, default=156_965, help="impressions generated (MIND-small train)")
    parser.add_argument("--sample", type=int, default=10_000, help="impressions trained on (0: all)")
    parser.add_argument("--dim", type=int, default=64, help="feature width D of each store")
    parser.add_argument("--trees", type=int, default=30)
    parser.add_argument("--loop-rows", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    t0 = time.perf_counter()
    full, features = make_world(args.impressions, args.dim, args.seed)
    print(f"world: {len(full)} impressions, {len(full.cand_items)} candidate rows "
          f"(mean {len(full.cand_items) / len(full):.1f}), {full.labels.mean():.2%} clicks, "
          f"history mean {full.history_lengths.mean():.1f}, {NEWS} news, D = {args.dim} "
          f"({time.perf_counter() - t0:.1f} s to make)")
    rng = np.random.default_rng(args.seed + 1)
    m = len(full) if args.sample <= 0 else min(args.sample, len(full))
    chosen = np.zeros(len(full), dtype=bool)
    chosen[rng.choice(len(full), m, replace=False)] = True
    sample = full.select(chosen)
    is_valid = np.zeros(m, dtype=bool)
    is_valid[int(m * 0.8):] = True
    train, valid = sample.select(~is_valid, "train"), sample.select(is_valid, "valid")

    config = LGBMConfig(sources=("text", "image"), fuse="hadamard", pooling="vector")
    builder = FeatureBuilder(config, features, resolve_cover(features))
    t = len(train.cand_items)
    vec_s, x = timed(builder.matrix, train)
    loop_rows = np.sort(rng.choice(t, min(args.loop_rows, t), replace=False))
    loop_s, x_loop = timed(per_row_loop, train, builder, loop_rows)
    np.testing.assert_allclose(x_loop, x[loop_rows], rtol=1e-4, atol=1e-5)
    loop_all = loop_s * t / len(loop_rows)

    rows = [("features: vectorised", t, x.shape[1], vec_s, t / vec_s, "")]
    rows.append(("features: per-row loop", len(loop_rows), x.shape[1], loop_s, len(loop_rows) / loop_s,
                 f"all rows ~{loop_all:.0f} s ({loop_all / vec_s:.0f}x), same values"))
    del x
    fits = [("fit: all negatives, 1 thread", {"neg_fraction": 1.0, "n_jobs": 1}),
            ("fit: 20% negatives, 1 thread", {"neg_fraction": 0.2, "n_jobs": 1}),
            ("fit: all negatives, 2 threads", {"neg_fraction": 1.0, "n_jobs": 2})]
    first = None
    for label, options in fits:
        ranker = LightGBMRanker(config, n_estimators=args.trees, patience=args.trees, **options)
        report = ranker.fit(train, valid, features)
        info = ranker.fit_info
        rows.append((label, info["train_rows"], info["features"], info["boost_seconds"],
                     info["train_rows"] / info["boost_seconds"],
                     f"{info['trees_trained']} trees, valid AUC {report.valid_metrics['auc']:.3f}, "
                     f"features {info['features_seconds']:.1f} s"))
        first = first or ranker
    score_s, _ = timed(first.score, sample)
    rows.append(("score (features + predict)", len(sample.cand_items), len(first.feature_names), score_s,
                 len(sample.cand_items) / score_s, f"{first.best_iteration} trees"))

    print(f"sample: {m} impressions ({len(train)} train, {len(valid)} valid), {t} train rows")
    print(f"{'step':32s} {'rows':>9s} {'F':>5s} {'seconds':>9s} {'rows/s':>11s}  note")
    for label, n, f, s, rate, note in rows:
        print(f"{label:32s} {n:9d} {f:5d} {s:9.2f} {rate:11,.0f}  {note}")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"Python {platform.python_version()}, numpy {np.__version__}, lightgbm {_lgbm_version()}, "
          f"load average {os.getloadavg()[0]:.1f}")


def _lgbm_version() -> str:
    import lightgbm

    return lightgbm.__version__


if __name__ == "__main__":
    main()
