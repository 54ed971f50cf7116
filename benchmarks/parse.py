"""How fast `storage.mind` reads a MIND-small-sized split, against a plain baseline.

The baseline is the straightforward reader: csv row by row, one Python object per
impression holding a list of (news_id, label) pairs, then converted to the same arrays.
Both run in the same process on the same files, and their arrays are checked to be equal.

Data: the train split of the project's synthetic world at scale "mind-small" when
`storage.synthetic` is importable, otherwise a small built-in generator of MIND-shaped
lines (65,238 news, 156,965 impressions, ~37 candidates with ~4% clicks and at least one
per impression, ~33 history items). Either is made once and reused from benchmarks/.cache/.

Usage: python benchmarks/parse.py [--source auto|synthetic|fallback] [--cache DIR]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from storage.errors import run_cli
from storage.mind import Behaviors, read_behaviors, read_news

TARGET_SECONDS = 20.0
N_NEWS = 65_238
N_IMPRESSIONS = 156_965
N_USERS = 50_000
MEAN_CANDIDATES = 37
MEAN_HISTORY = 33
CLICK_RATE = 0.04
T = TypeVar("T")
CATEGORIES = ("news", "sports", "finance", "lifestyle", "health", "travel", "autos", "video")


# ---------------------------------------------------------------- data


def _synthetic_split(cache: Path) -> Path | None:
    """The synthetic world's train split, generated once; None if the module is missing."""
    try:
        from storage.synthetic import generate_world
    except ImportError:
        return None
    world = cache / "synthetic-mind-small"
    if not (world / "train" / "behaviors.tsv").is_file():
        partial = cache / "synthetic-mind-small.partial"
        shutil.rmtree(partial, ignore_errors=True)
        generate_world(partial, scale="mind-small", seed=0, images=False)
        shutil.rmtree(world, ignore_errors=True)
        partial.rename(world)  # only a finished world gets the reusable name
    return world / "train"


def _fallback_split(cache: Path, seed: int = 0) -> Path:
    """Write (once) MIND-shaped news.tsv and behaviors.tsv with MIND-small's sizes."""
    out = cache / "fallback-mind-small"
    if (out / "behaviors.tsv").is_file():
        return out
    rng = np.random.default_rng(seed)
    partial = cache / "fallback-mind-small.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)

    numbers = rng.choice(np.arange(1, 4 * N_NEWS), size=N_NEWS, replace=False)
    news_ids = np.array([f"N{k}" for k in numbers], dtype=object)  # (N,)
    words = [f"w{k}" for k in range(5_000)]
    entity = (
        '[{"Label": "Example", "Type": "P", "WikidataId": "Q1", "Confidence": 1.0, '
        '"OccurrenceOffsets": [0], "SurfaceForms": ["Example"]}]'
    )
    with open(partial / "news.tsv", "w", encoding="utf-8") as f:
        for i, news_id in enumerate(news_ids):
            title = " ".join(words[k] for k in rng.integers(0, len(words), 11))
            abstract = "" if i % 10 == 0 else " ".join(words[k] for k in rng.integers(0, len(words), 30))
            category = CATEGORIES[i % len(CATEGORIES)]
            entities = entity if i % 3 == 0 else "[]"
            url = f"https://assets.msn.com/labs/mind/{news_id}.html"
            row = (news_id, category, f"{category}-sub", title, abstract, url, entities, "[]")
            f.write("\t".join(row) + "\n")

    # Geometric lengths give MIND's long tail; history may be empty, candidates >= 2.
    n_cand = 1 + rng.geometric(1 / (MEAN_CANDIDATES - 1), N_IMPRESSIONS)  # (M,)
    n_hist = rng.geometric(1 / (MEAN_HISTORY + 1), N_IMPRESSIONS) - 1  # (M,)
    cand_off = np.concatenate(([0], np.cumsum(n_cand)))  # (M+1,)
    hist_off = np.concatenate(([0], np.cumsum(n_hist)))  # (M+1,)
    cand = rng.integers(0, N_NEWS, cand_off[-1])  # (T,)
    hist = rng.integers(0, N_NEWS, hist_off[-1])  # (H,)
    labels = rng.random(cand_off[-1]) < CLICK_RATE  # (T,)
    no_click = np.add.reduceat(labels.astype(np.int64), cand_off[:-1]) == 0  # (M,)
    forced = cand_off[:-1][no_click] + rng.integers(0, n_cand[no_click])
    labels[forced] = True  # every labeled MIND impression has a click
    tokens = np.where(labels, news_ids[cand] + "-1", news_ids[cand] + "-0")  # (T,) object
    history = news_ids[hist]  # (H,) object
    users = rng.integers(1, N_USERS + 1, N_IMPRESSIONS)
    start = datetime.datetime(2019, 11, 9)
    seconds = np.sort(rng.integers(0, 5 * 86_400, N_IMPRESSIONS))
    with open(partial / "behaviors.tsv", "w", encoding="utf-8") as f:
        for i in range(N_IMPRESSIONS):
            t = start + datetime.timedelta(seconds=int(seconds[i]))
            clock = f"{t.hour % 12 or 12}:{t.minute:02d}:{t.second:02d}"
            when = f"{t.month}/{t.day}/{t.year} {clock} {'AM' if t.hour < 12 else 'PM'}"
            hist_text = " ".join(history[hist_off[i] : hist_off[i + 1]])
            cand_text = " ".join(tokens[cand_off[i] : cand_off[i + 1]])
            f.write(f"{i + 1}\tU{users[i]}\t{when}\t{hist_text}\t{cand_text}\n")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


# ---------------------------------------------------------------- baseline


@dataclass
class Impression:
    impression_id: int
    user_id: str
    time: datetime.datetime
    history: list[str]
    candidates: list[tuple[str, int]]


@dataclass
class NewsRow:
    news_id: str
    category: str
    subcategory: str
    title: str
    abstract: str
    url: str
    title_entities: str
    abstract_entities: str


def baseline_news_index(path: Path) -> dict[str, int]:
    """Row by row into NewsRow objects, then the news id -> row index dict."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = [NewsRow(*row) for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return {row.news_id: i for i, row in enumerate(rows)}


def baseline_behaviors(path: Path, index: dict[str, int]) -> dict[str, np.ndarray]:
    """Row by row into Impression objects, then into the same arrays as `Behaviors`."""
    impressions: list[Impression] = []
    with open(path, encoding="utf-8", newline="") as f:
        for imp_id, user, when, history, candidates in csv.reader(
            f, delimiter="\t", quoting=csv.QUOTE_NONE
        ):
            pairs = []
            for token in candidates.split():
                news_id, label = token.rsplit("-", 1)
                pairs.append((news_id, int(label)))
            stamp = datetime.datetime.strptime(when, "%m/%d/%Y %I:%M:%S %p")
            impressions.append(Impression(int(imp_id), user, stamp, history.split(), pairs))
    utc = datetime.timezone.utc
    return {
        "impression_ids": np.array([imp.impression_id for imp in impressions], dtype=np.int64),
        "times": np.array(
            [int(imp.time.replace(tzinfo=utc).timestamp()) for imp in impressions], np.int64
        ),
        "hist_offsets": np.cumsum([0] + [len(imp.history) for imp in impressions]),
        "hist_items": np.array(
            [index[n] for imp in impressions for n in imp.history], dtype=np.int32
        ),
        "cand_offsets": np.cumsum([0] + [len(imp.candidates) for imp in impressions]),
        "cand_items": np.array(
            [index[n] for imp in impressions for n, _ in imp.candidates], dtype=np.int32
        ),
        "labels": np.array([y for imp in impressions for _, y in imp.candidates], dtype=np.int8),
    }


def _same(ours: Behaviors, base: dict[str, np.ndarray]) -> bool:
    return all(np.array_equal(getattr(ours, name), value) for name, value in base.items())


# ---------------------------------------------------------------- run


def _timed(fn: Callable[..., T], *args: object) -> tuple[T, float]:
    """fn(*args) and its wall-clock seconds."""
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time storage.mind against a csv baseline.")
    parser.add_argument("--source", choices=("auto", "synthetic", "fallback"), default="auto")
    parser.add_argument(
        "--cache", type=Path, default=Path(__file__).resolve().parent / ".cache",
        help="where generated data is kept between runs (default: benchmarks/.cache)",
    )
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)

    split = None
    source = "fallback generator in benchmarks/parse.py"
    if args.source in ("auto", "synthetic"):
        split = _synthetic_split(args.cache)
        if split is None and args.source == "synthetic":
            print("storage.synthetic is not importable", file=sys.stderr)
            return 1
        if split is not None:
            source = "storage.synthetic.generate_world(scale='mind-small', seed=0), train split"
    if split is None:
        split = _fallback_split(args.cache)
    news_path, behaviors_path = split / "news.tsv", split / "behaviors.tsv"

    news, t_news = _timed(read_news, news_path)
    behaviors, t_beh = _timed(read_behaviors, behaviors_path, news.index)
    base_index, t_base_news = _timed(baseline_news_index, news_path)
    base, t_base_beh = _timed(baseline_behaviors, behaviors_path, base_index)

    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, numpy {np.__version__}")
    print(f"data: {source}")
    print(f"      {split}")
    mean_hist = len(behaviors.hist_items) / max(len(behaviors), 1)
    mean_cand = behaviors.n_candidates / max(len(behaviors), 1)
    print(f"      {len(news):,} news, {len(behaviors):,} impressions, "
          f"{behaviors.n_candidates:,} candidates ({mean_cand:.1f}/impression), "
          f"mean history {mean_hist:.1f}, "
          f"{behaviors_path.stat().st_size / 2**20:.1f} MiB behaviors.tsv")
    print()
    rows = [
        ("news.tsv", "storage.mind", len(news), t_news, t_base_news),
        ("news.tsv", "baseline", len(news), t_base_news, t_base_news),
        ("behaviors.tsv", "storage.mind", len(behaviors), t_beh, t_base_beh),
        ("behaviors.tsv", "baseline", len(behaviors), t_base_beh, t_base_beh),
    ]
    print(f"{'file':<14}  {'reader':<20}  {'seconds':>8}  {'rows/s':>11}  {'speedup':>8}")
    for file, reader, n, seconds, baseline in rows:
        print(f"{file:<14}  {reader:<20}  {seconds:>8.2f}  {n / seconds:>11,.0f}  "
              f"{baseline / seconds:>7.1f}x")
    print()
    same = _same(behaviors, base)
    print(f"arrays equal to the baseline's: {'yes' if same else 'NO'}")
    verdict = "holds" if t_beh < TARGET_SECONDS else "MISSED"
    print(f"target: behaviors.tsv in under {TARGET_SECONDS:.0f} s: {verdict} ({t_beh:.2f} s; "
          f"news + behaviors {t_news + t_beh:.2f} s)")
    return 0 if same else 1


if __name__ == "__main__":
    run_cli(main)
