"""A synthetic world shaped exactly like MIND + IM-MIND, with known ground truth.

`python -m storage.synthetic --out DIR --scale tiny|small|mind-small --seed N` (or
`generate_world(out, scale, seed, images, cover_rate, cover_effect=..., visual_weight=...)`)
writes files that the MIND readers take as they take the real data, plus the hidden truth
that produced them:

    DIR/train/{news.tsv,behaviors.tsv}   DIR/dev/{news.tsv,behaviors.tsv,click_probs.txt}
    DIR/test/{news.tsv,behaviors.tsv,truth.txt}   DIR/images/<news_id>.jpg
    DIR/hidden/{news.tsv,users.tsv}      DIR/world.json (written last: marks a complete world)

The hidden structure
--------------------
- 16 topics. A topic fixes the category, picks the subcategory among its own, and supplies
  about half of the title and abstract words (the rest are shared filler words and a few
  words of other topics) and its own named entities (with WikidataIds and offsets).
- Every news has a visual style in 0..4 (disc, triangle, stripes, ring, cross), drawn
  independently of everything else and never visible in the text. A news has a cover with
  probability `cover_rate` (0.44, as 56% of MIND-small news have no IM-MIND image); the
  cover's background colour follows the topic, its big jittered shape follows the style.
- Every news has a popularity z ~ N(0, 1): candidates are shown with probability
  proportional to exp(0.6 z), and z enters the click model.
- A user has topic interests theta ~ Dirichlet(0.3), a visual taste tau ~ Dirichlet(0.5)
  over the styles, and an activity level that sets how many impressions they get.

The click model (also written into world.json)
----------------------------------------------
For user u and candidate n in an impression:

    logit = a * theta_u[topic_n]                           (topic_match, in [0, 1])
          + w * (tau_u[style_n] - 1/S) * has_cover_n       (the centred visual match; a user
                                                            sees no style without a cover)
          + e * has_cover_n                                (cover presence alone)
          + c * popularity_n
          + bias + noise,   noise ~ N(0, noise_sd) per candidate row
    p = sigmoid(logit),  click ~ Bernoulli(p)

with a = 8, c = 0.4, noise_sd = 0.5, S = 5 styles, and `bias` solved numerically per world
so that the expected click-through rate (after the forcing below) equals the scale's target
(4% for mind-small, as MIND). Two knobs separate what a cover's *content* does from what its
mere *presence* does:

- `visual_weight` w (default 4, `--visual-weight`): the taste-dependent effect of the style.
  The match is centred on 1/S, the mean of tau_u over the styles, which is exactly zero for
  every user (tau_u sums to 1), and also its population mean over (user, covered news) pairs
  (styles are uniform and independent of users). So the style term moves clicks between
  covered news but, averaged over styles, adds nothing to "this news has a cover".
- `cover_effect` e (default 0.8, `--cover-effect`): a logit bonus for having any cover.

The defaults decompose the former term `4 * tau_u[style_n] * has_cover_n` exactly (w = 4,
e = 4/S = 0.8), so a default world's files are the bytes they were before the split. A
"null" world (w = 0, e = 0: images carry nothing) and a "presence only" world (w = 0,
e > 0) are one flag away. The defaults are that decomposition, not values tuned to make
images look useful or useless.

An impression whose Bernoulli draws give no click gets exactly one, picked among its
candidates with probability proportional to p: MIND only keeps impressions with a click.
`dev/click_probs.txt` holds p itself (the noise draw included), so ranking by it is the
ceiling no model can pass; the summary reports it ("oracle"), the same oracle without both
image terms ("oracle_text_only": what a ranker that cannot see images could reach at best),
the oracle without the style term ("oracle_presence": what knowing only whether a news has a
cover could reach) and a random ranker. Measured dev AUC with the defaults at every scale:
oracle about 0.78-0.83, text-only oracle about 0.72-0.76, random 0.5. In a null world the
three oracles coincide.

Histories. Before train starts, a warm user has clicked some older news, sampled in
proportion to exp(a * topic_match + w * (visual_match - 1/S) * has_cover + e * has_cover
+ (c + 0.6) * popularity) (the click model in its rare-click limit times the exposure), so a
null world's histories ignore covers too. 5% of users start with no
history and 8% with 1 to 4 clicks (cold start). A history is oldest first and grows: a
train impression sees the clicks of the user's earlier train impressions; dev sees all
of train; test sees train and dev. Within dev (and within test) a user's history is fixed,
so no evaluation label leaks into another impression's history.

Time. Train covers the days before 11/15/2019, dev is that day (one day after train, as in
MIND), test the day after dev. Candidates are news published in the two days before the
impression (a window too thin for the impression's count is widened to twice the count);
histories only hold news published (and clicked) before it. News no behavior references are
dropped, so a world's news count and cover share come out a little off the generated ones
(covered news are clicked into histories a bit more often).

Determinism: every random choice comes from numpy Generators spawned from the seed (one
stream per concern, one per card), cards are JPEG quality 90 with Pillow's embedded font,
so one seed gives the same bytes (given the same numpy, Pillow and libjpeg versions).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from storage.cards import STYLE_NAMES, draw_cover, render_card
from storage.errors import PipelineError, run_cli
from storage.locks import lock_exclusively
from storage.submission import write_truth, write_values

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
SPLITS = ("train", "dev", "test")
JPEG_QUALITY = 90
DEV_DAY = datetime.datetime(2019, 11, 15, tzinfo=datetime.timezone.utc)
DAY = 86_400


# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class Scale:
    """How big a world is; the same generative model runs at every scale."""

    name: str
    news: int  # generated; a world keeps the ones its behaviors reference (most of them)
    users: int
    train_impressions: int
    dev_impressions: int
    test_impressions: int
    candidates_mean: float  # candidates per impression: a clipped log-normal
    candidates_min: int
    candidates_max: int
    candidates_sigma: float
    history_mean: float  # warm users' clicks before train starts: a clipped log-normal
    history_max: int
    train_days: int
    pre_days: int  # the older news that pre-train histories are drawn from span these days
    target_ctr: float  # clicks / candidate rows; the click model's bias is solved for it


SCALES: dict[str, Scale] = {
    "tiny": Scale(
        "tiny", news=300, users=150, train_impressions=600, dev_impressions=300, test_impressions=150,
        candidates_mean=13.0, candidates_min=5, candidates_max=30, candidates_sigma=0.35,
        history_mean=12.0, history_max=60, train_days=3, pre_days=10, target_ctr=0.10,
    ),
    "small": Scale(
        "small", news=3000, users=2000, train_impressions=8000, dev_impressions=3000, test_impressions=1500,
        candidates_mean=22.0, candidates_min=5, candidates_max=80, candidates_sigma=0.45,
        history_mean=22.0, history_max=150, train_days=4, pre_days=14, target_ctr=0.07,
    ),
    # MIND-small: 65,238 news, 50,000 users, 156,965 train / 73,152 dev impressions, about 37
    # candidates (5 to 300, skewed), history about 33, CTR about 4%. MIND-small has no test
    # split; ours gets as many impressions as dev.
    "mind-small": Scale(
        "mind-small", news=65238, users=50000, train_impressions=156965, dev_impressions=73152,
        test_impressions=73152, candidates_mean=37.0, candidates_min=5, candidates_max=300, candidates_sigma=0.7,
        history_mean=29.0, history_max=500, train_days=6, pre_days=21, target_ctr=0.04,
    ),
}


@dataclass(frozen=True)
class WorldModel:
    """The generative constants that do not change with the scale."""

    n_styles: int = 5
    cover_rate: float = 0.44
    interest_alpha: float = 0.3  # Dirichlet over topics: most users care about a few
    taste_alpha: float = 0.5  # Dirichlet over visual styles
    cold_empty_share: float = 0.05  # users with no click before train
    cold_few_share: float = 0.08  # users with 1-4 clicks before train
    pre_share: float = 0.45  # news published before train starts (history material)
    fresh_days: float = 2.0  # candidates were published at most this long before
    exposure_popularity: float = 0.6  # candidates are shown in proportion to exp(this * z)
    abstract_empty_share: float = 0.06
    title_tokens_mean: float = 10.0  # tokens (an entity counts once): about 11.5 words
    abstract_tokens_mean: float = 24.0


@dataclass(frozen=True)
class ClickModel:
    """Coefficients of logit = topic*theta[t] + visual_weight*(tau[s] - 1/S)*has_cover
    + cover_effect*has_cover + popularity*z + bias + noise.

    The defaults split the former `4 * tau[s] * has_cover` exactly: visual_weight 4 on the
    centred match, cover_effect 4 * (1/S) = 0.8 for the mean match it no longer holds.
    """

    topic: float = 8.0
    visual_weight: float = 4.0  # taste-dependent: times the centred match tau[s] - 1/S
    cover_effect: float = 0.8  # presence alone: any cover, whatever its style
    popularity: float = 0.4
    noise_sd: float = 0.5

    @property
    def visual_centre(self) -> float:
        """The match's mean over styles (1/S for every user), so the style term averages to 0."""
        return 1.0 / WORLD.n_styles


WORLD = WorldModel()
CLICKS = ClickModel()

# ----------------------------------------------------------------------------- vocabulary

# (name, category, subcategories, topic words). Multi-word terms count as one token.
TOPICS: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("politics", "news", ("newspolitics", "newsus"), (
        "senate", "vote", "election", "congress", "bill", "campaign", "governor", "policy", "debate",
        "lawmakers", "ballot", "hearing", "caucus", "reform", "budget", "candidate", "primary",
        "mayor", "legislation", "voters")),
    ("crime", "news", ("newscrime", "newsus"), (
        "police", "arrest", "suspect", "court", "trial", "investigation", "charged", "jury",
        "robbery", "detectives", "sentence", "prison", "lawsuit", "judge", "evidence", "victim",
        "warrant", "fraud", "custody", "sheriff")),
    ("world", "news", ("newsworld",), (
        "embassy", "border", "treaty", "minister", "summit", "protest", "refugees", "diplomat",
        "sanctions", "parliament", "ceasefire", "alliance", "foreign", "talks", "regime", "envoy",
        "crisis", "military", "coalition", "president")),
    ("football", "sports", ("football_nfl", "football_ncaa"), (
        "quarterback", "touchdown", "coach", "playoff", "receiver", "defense", "draft", "yards",
        "kickoff", "tackle", "injury", "roster", "stadium", "rookie", "interception", "linebacker",
        "field goal", "end zone", "sideline", "fumble")),
    ("basketball", "sports", ("basketball_nba", "basketball_ncaa"), (
        "dunk", "rebounds", "guard", "forward", "assists", "three-pointer", "point guard", "center",
        "bench", "overtime", "buzzer", "franchise", "trade", "lineup", "scoring", "arena",
        "free throw", "layup", "tipoff", "hoops")),
    ("soccer", "sports", ("soccer",), (
        "goal", "striker", "midfielder", "goalkeeper", "penalty", "match", "transfer", "manager",
        "derby", "cup", "pitch", "fixture", "winger", "referee", "header", "clean sheet",
        "supporters", "squad", "club", "stoppage time")),
    ("markets", "finance", ("finance-markets", "finance-companies"), (
        "stocks", "shares", "investors", "earnings", "rally", "index", "trading", "bonds",
        "dividend", "quarter", "profit", "revenue", "analysts", "valuation", "inflation",
        "interest rates", "futures", "portfolio", "gains", "selloff")),
    ("money", "finance", ("finance-real-estate", "finance-savemoney"), (
        "mortgage", "housing", "rent", "homeowners", "buyers", "listing", "property", "loan",
        "savings", "retirement", "taxes", "credit", "pension", "debt", "insurance", "wages",
        "prices", "neighborhood", "apartment", "paycheck")),
    ("food", "foodanddrink", ("recipes", "restaurantsandnews"), (
        "recipe", "dinner", "baking", "chicken", "soup", "dessert", "chef", "restaurant", "flavor",
        "sauce", "grill", "pasta", "cookies", "breakfast", "salad", "pie", "spices", "cheese",
        "menu", "kitchen")),
    ("travel", "travel", ("travelnews", "traveltripideas"), (
        "airline", "flights", "beach", "resort", "cruise", "hotel", "passport", "island",
        "destination", "vacation", "tourists", "airport", "luggage", "itinerary", "journey",
        "scenic", "trip", "tour", "getaway", "road trip")),
    ("health", "health", ("medical", "wellness"), (
        "doctors", "patients", "vaccine", "diet", "sleep", "cancer", "study", "symptoms", "heart",
        "hospital", "exercise", "weight", "brain", "therapy", "nutrition", "disease", "clinic",
        "fitness", "blood pressure", "wellness")),
    ("weather", "weather", ("weathertopstories",), (
        "storm", "snow", "forecast", "hurricane", "rain", "temperatures", "winds", "flooding",
        "freeze", "frost", "tornado", "drought", "heat wave", "cold front", "blizzard", "showers",
        "radar", "warning", "degrees", "clouds")),
    ("autos", "autos", ("autosnews", "autosenthusiasts"), (
        "sedan", "pickup", "engine", "electric", "horsepower", "recall", "dealership", "hybrid",
        "mileage", "suv", "truck", "coupe", "charging", "battery", "torque", "steering", "crash test",
        "fuel", "brakes", "test drive")),
    ("movies", "movies", ("movienews", "movies-celebrity"), (
        "film", "director", "trailer", "sequel", "box office", "premiere", "actress", "actor",
        "script", "oscar", "cast", "studio", "blockbuster", "scene", "screening", "remake", "role",
        "critics", "cinema", "red carpet")),
    ("music", "music", ("musicnews", "music-celebrity"), (
        "album", "singer", "concert", "tour", "song", "band", "guitar", "lyrics", "chart", "rapper",
        "festival", "grammy", "single", "stage", "playlist", "record", "duet", "vocals", "drummer",
        "encore")),
    ("tv", "tv", ("tvnews", "tv-celebrity"), (
        "episode", "series", "season finale", "showrunner", "network", "streaming", "sitcom",
        "drama", "host", "reality show", "ratings", "spinoff", "pilot", "characters", "binge",
        "talk show", "viewers", "cancelled", "reboot", "cliffhanger")),
)

FILLER = (
    "the", "a", "of", "to", "in", "for", "on", "with", "after", "new", "says", "how", "why", "what",
    "more", "first", "big", "this", "over", "about", "year", "week", "could", "will", "just", "best",
    "top", "report", "people", "time", "last", "day", "here", "may", "back", "is", "are", "from",
    "by", "at", "and", "now", "still", "ahead", "amid", "as", "its", "their", "all", "one", "two",
    "again", "early", "late", "major", "local", "latest", "inside", "look", "way",
)

_FIRST = ("Avery", "Blake", "Carmen", "Dalia", "Elias", "Farah", "Gideon", "Hana", "Ivo", "Jolene",
          "Kasim", "Lena", "Marek", "Nadia", "Orla", "Pavel", "Quinn", "Rosa", "Soren", "Talia",
          "Umar", "Vera", "Wes", "Yara", "Zane", "Ines", "Milo", "Priya", "Theo", "Esme")
_LAST = ("Ashgrove", "Bellamy", "Castellan", "Dunmore", "Ellery", "Fairweather", "Galloway",
         "Hartwell", "Ingram", "Jessup", "Kettering", "Lockhart", "Merriman", "Northcott", "Oakhurst",
         "Pemberton", "Quill", "Redfern", "Stanwick", "Thorne", "Underhill", "Vance", "Whitlock",
         "Yardley", "Zeller", "Marlowe", "Brandt", "Corliss", "Dray", "Halloran")
_ORG_ROOT = ("Northwind", "Bluecrest", "Ironvale", "Silverline", "Redstone", "Greenhaven",
             "Brightwater", "Stonebridge", "Goldleaf", "Highmoor", "Clearfield", "Westbrook")
_ORG_SUFFIX = {"politics": "Party", "crime": "Bureau", "world": "Council", "football": "Rangers",
               "basketball": "Hawks", "soccer": "United", "markets": "Capital", "money": "Bank",
               "food": "Kitchen", "travel": "Airways", "health": "Clinic", "weather": "Weather Service",
               "autos": "Motors", "movies": "Pictures", "music": "Records", "tv": "Network"}
_PLACE_PREFIX = ("Port", "Lake", "North", "East", "Mount", "New", "Fort", "West", "Glen", "South")
_PLACE_ROOT = ("Calder", "Varrow", "Tessaly", "Brindle", "Oskan", "Merrow", "Halvik", "Duneford",
               "Corran", "Lissom", "Ardent", "Pellin")
N_GLOBAL_ENTITIES = 6


@dataclass(frozen=True)
class Entity:
    label: str
    type: str  # MIND's one-letter types: P person, O organization, G geographic
    wikidata_id: str
    surface_forms: tuple[str, ...]  # how a text may mention it


def vocabulary_entities() -> tuple[tuple[Entity, ...], ...]:
    """Per topic 5 fictional entities (2 people, 2 organisations, 1 place), then the shared places.

    Fixed across seeds (its own constant stream), so every world speaks the same language.
    """
    rng = np.random.default_rng(20191115)
    people = rng.permutation(len(_FIRST) * len(_LAST))
    places = rng.permutation(len(_PLACE_PREFIX) * len(_PLACE_ROOT))
    qid = iter(range(1_000_003, 10**9, 7_919))
    out: list[tuple[Entity, ...]] = []
    for k, (name, *_rest) in enumerate(TOPICS):
        ents: list[Entity] = []
        for j in range(2):
            first, last = divmod(int(people[2 * k + j]), len(_LAST))
            full = f"{_FIRST[first]} {_LAST[last]}"
            ents.append(Entity(full, "P", f"Q{next(qid)}", (full, _LAST[last])))
        roots = rng.choice(len(_ORG_ROOT), size=2, replace=False)
        for r in roots:
            label = f"{_ORG_ROOT[int(r)]} {_ORG_SUFFIX[name]}"
            ents.append(Entity(label, "O", f"Q{next(qid)}", (label,)))
        pre, root = divmod(int(places[k]), len(_PLACE_ROOT))
        place = f"{_PLACE_PREFIX[pre]} {_PLACE_ROOT[root]}"
        ents.append(Entity(place, "G", f"Q{next(qid)}", (place,)))
        out.append(tuple(ents))
    shared = []
    for j in range(N_GLOBAL_ENTITIES):
        pre, root = divmod(int(places[len(TOPICS) + j]), len(_PLACE_ROOT))
        place = f"{_PLACE_PREFIX[pre]} {_PLACE_ROOT[root]}"
        shared.append(Entity(place, "G", f"Q{next(qid)}", (place,)))
    out.append(tuple(shared))
    return tuple(out)


# ----------------------------------------------------------------------------- text


def _compose(
    n_tokens: int,
    n_entities: int,
    topic: int,
    other_topic: Sequence[int],
    kind: Sequence[float],
    pick: Sequence[float],
    ent_slot_keys: Sequence[float],
    ent_pick: Sequence[float],
    confidence: Sequence[float],
    entities: tuple[tuple[Entity, ...], ...],
    sentence: bool,
) -> tuple[str, str]:
    """One title or abstract and its MIND entity JSON, from pre-drawn uniforms (no rng here).

    `kind`, `pick`, `other_topic` have one value per token; the `n_entities` tokens with the
    smallest `ent_slot_keys` become entity mentions. Offsets count characters of the result.
    """
    words = TOPICS[topic][3]
    ent_slots = set(np.argsort(ent_slot_keys[:n_tokens], kind="stable")[:n_entities].tolist())
    parts: list[str] = []
    found: dict[int, dict] = {}  # entity key -> its JSON object; insertion order = first mention
    pos = 0
    for i in range(n_tokens):
        if i in ent_slots:
            u = ent_pick[i]
            # 80% an entity of the news' own topic, else a shared place.
            group = topic if u < 0.8 else len(TOPICS)
            pool = entities[group]
            which = int((u / 0.8 if u < 0.8 else (u - 0.8) / 0.2) * len(pool)) % len(pool)
            ent = pool[which]
            form = ent.surface_forms[int(pick[i] * len(ent.surface_forms)) % len(ent.surface_forms)]
            key = group * 100 + which
            obj = found.get(key)
            if obj is None:
                obj = {"Label": ent.label, "Type": ent.type, "WikidataId": ent.wikidata_id,
                       "Confidence": round(0.85 + 0.15 * confidence[i], 3),
                       "OccurrenceOffsets": [], "SurfaceForms": []}
                found[key] = obj
            obj["OccurrenceOffsets"].append(pos)
            obj["SurfaceForms"].append(form)
            token = form
        else:
            k = kind[i]
            if k < 0.5:
                token = words[int(pick[i] * len(words)) % len(words)]
            elif k < 0.56:
                other = TOPICS[int(other_topic[i])][3]
                token = other[int(pick[i] * len(other)) % len(other)]
            else:
                token = FILLER[int(pick[i] * len(FILLER)) % len(FILLER)]
            if i == 0:
                token = token[0].upper() + token[1:]
        parts.append(token)
        pos += len(token) + 1
    text = " ".join(parts) + ("." if sentence else "")
    return text, json.dumps(list(found.values()))


def _news_texts(
    rng: np.random.Generator, topic: np.ndarray, entities: tuple[tuple[Entity, ...], ...]
) -> tuple[list[str], list[str], list[str], list[str], list[str]]:
    """Subcategory, title, abstract and both entity columns for each news (N,) of `topic`.

    Every random number is drawn up front in whole arrays, so the per-news loop only
    assembles strings and the draws do not depend on the text that was built.
    """
    n = len(topic)
    sub_u = rng.random(n)
    n_title = np.clip(rng.poisson(WORLD.title_tokens_mean, n), 4, 18)
    e_title = np.minimum(rng.choice(3, n, p=[0.3, 0.5, 0.2]), n_title - 3)
    has_abstract = rng.random(n) >= WORLD.abstract_empty_share
    n_abs = np.clip(rng.poisson(WORLD.abstract_tokens_mean, n), 8, 45)
    e_abs = rng.choice(4, n, p=[0.3, 0.35, 0.25, 0.1])
    lengths = n_title + n_abs
    total = int(lengths.sum())
    kind, pick, keys, ent_pick, conf = (rng.random(total).tolist() for _ in range(5))
    other = rng.integers(0, len(TOPICS), total).tolist()
    start = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    subcats, titles, abstracts, t_ents, a_ents = [], [], [], [], []
    for i in range(n):
        k = int(topic[i])
        subs = TOPICS[k][2]
        subcats.append(subs[int(sub_u[i] * len(subs)) % len(subs)])
        a, m = start[i], int(n_title[i])
        sl = slice(a, a + m)
        draws = (other[sl], kind[sl], pick[sl], keys[sl], ent_pick[sl], conf[sl])
        title, tj = _compose(m, int(e_title[i]), k, *draws, entities, False)
        titles.append(title)
        t_ents.append(tj)
        if has_abstract[i]:
            sl = slice(a + m, start[i + 1])
            draws = (other[sl], kind[sl], pick[sl], keys[sl], ent_pick[sl], conf[sl])
            abstract, aj = _compose(int(n_abs[i]), int(e_abs[i]), k, *draws, entities, True)
        else:
            abstract, aj = "", ""
        abstracts.append(abstract)
        a_ents.append(aj)
    return subcats, titles, abstracts, t_ents, a_ents


# ----------------------------------------------------------------------------- sampling


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _lognormal_counts(rng: np.random.Generator, mean: float, sigma: float, lo: int, hi: int, size: int) -> np.ndarray:
    """Skewed positive counts with about the given mean (before clipping to [lo, hi])."""
    raw = rng.lognormal(math.log(mean) - sigma**2 / 2, sigma, size)
    return np.clip(np.rint(raw), lo, hi).astype(np.int64)


def _sample_in_ranges(rng: np.random.Generator, cw: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """One index per row from [lo, hi), weighted: `cw` (N+1,) are cumulative weights from 0."""
    u = cw[lo] + rng.random(len(lo)) * (cw[hi] - cw[lo])
    return np.clip(np.searchsorted(cw, u, side="right") - 1, lo, hi - 1)


def _sample_candidates(
    rng: np.random.Generator, pub: np.ndarray, weight: np.ndarray, times: np.ndarray, counts: np.ndarray, fresh_s: int
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct candidates per impression among the news published in the `fresh_s` before it.

    pub (N,) sorted publication times, weight (N,) exposure weights, times (M,), counts (M,).
    Returns offsets (M+1,) and items (T,) news indices. Draws with replacement, then redraws
    the repeats of an impression until none is left (few rounds: pools are >= 2x the count).
    """
    hi = np.searchsorted(pub, times, side="left")  # published strictly before the impression
    lo = np.searchsorted(pub, times - fresh_s, side="left")
    lo = np.minimum(lo, np.maximum(hi - 2 * counts, 0))  # widen thin windows to 2x the count
    if np.any(hi <= lo):
        raise RuntimeError("an impression has no news published before it; pre-train news are missing")
    counts = np.minimum(counts, hi - lo)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    imp = np.repeat(np.arange(len(times)), counts)  # (T,)
    cw = np.concatenate([[0.0], np.cumsum(weight)])
    items = _sample_in_ranges(rng, cw, lo[imp], hi[imp])
    rows = np.arange(len(items))
    n = len(pub)
    for _ in range(1000):
        key = imp[rows] * n + items[rows]
        order = np.argsort(key, kind="stable")
        dup_sorted = np.zeros(len(rows), bool)
        dup_sorted[1:] = key[order][1:] == key[order][:-1]
        bad = rows[order[dup_sorted]]
        if bad.size == 0:
            return offsets, items
        items[bad] = _sample_in_ranges(rng, cw, lo[imp[bad]], hi[imp[bad]])
        # Only impressions that had a repeat can have one now.
        touched = np.unique(imp[bad])
        rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in touched.tolist()])
    raise RuntimeError("candidate sampling did not converge; a pool is too small for its count")


def _force_one_click(rng: np.random.Generator, offsets: np.ndarray, p: np.ndarray, labels: np.ndarray) -> int:
    """Give each impression without a click one, picked in proportion to p; returns how many."""
    n_click = np.add.reduceat(labels.astype(np.int64), offsets[:-1])
    empty = np.flatnonzero(n_click == 0)
    cp = np.concatenate([[0.0], np.cumsum(p)])
    a, b = offsets[empty], offsets[empty + 1]
    labels[_sample_in_ranges(rng, cp, a, b)] = True
    return len(empty)


def _solve_bias(base_logit: np.ndarray, offsets: np.ndarray, target_ctr: float, max_impressions: int = 20_000) -> float:
    """The bias whose expected CTR, counting the forced clicks, is `target_ctr`.

    Expected clicks of an impression = sum p + prod(1 - p) (the forced one when none fell).
    Solved by bisection on the first `max_impressions` impressions: train impressions in
    random order, a fair sample, since every split draws users and candidates the same way.
    """
    m = min(max_impressions, len(offsets) - 1)
    x = base_logit[: offsets[m]]
    starts = offsets[:m]
    lo, hi = -20.0, 10.0
    for _ in range(50):
        mid = (lo + hi) / 2
        p = _sigmoid(x + mid)
        none = np.exp(np.add.reduceat(np.log1p(-np.minimum(p, 1 - 1e-12)), starts))
        ctr = (p.sum() + none.sum()) / len(x)
        lo, hi = (mid, hi) if ctr < target_ctr else (lo, mid)
    return (lo + hi) / 2


def _visual_logit(clicks: ClickModel, match: np.ndarray, cover: np.ndarray) -> np.ndarray:
    """visual_weight * (match - 1/S) * cover + cover_effect * cover, for tau matches and 0/1 covers.

    Computed as visual_weight * match * cover + (cover_effect - visual_weight / S) * cover:
    the same value, and with the defaults the second coefficient is exactly 0.0 (4 * 0.2 is
    0.8 in binary too), so default worlds keep their former bytes.
    """
    shift = clicks.cover_effect - clicks.visual_weight * clicks.visual_centre
    return clicks.visual_weight * match * cover + shift * cover


def _base_histories(
    rng: np.random.Generator,
    clicks: ClickModel,
    lengths: np.ndarray,
    theta: np.ndarray,
    tau: np.ndarray,
    pool: np.ndarray,
    topic: np.ndarray,
    style: np.ndarray,
    cover: np.ndarray,
    pop: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Clicks before train: (user, news) pairs, news in `pool`, at most lengths[u] per user, distinct.

    Weights follow exp(a*topic_match + visual term (see _visual_logit) + (c + exposure)*z). Sampled in
    two steps so no (users x news) matrix is needed: a (topic, style, cover) cell per click
    from the user's (U, 160) cell weights, then a news inside the cell by its popularity.
    """
    n_users = len(lengths)
    n_topics, n_styles = theta.shape[1], tau.shape[1]
    n_cells = n_topics * n_styles * 2
    cell = (topic[pool] * n_styles + style[pool]) * 2 + cover[pool].astype(np.int64)  # (P,)
    w = np.exp((clicks.popularity + WORLD.exposure_popularity) * pop[pool])  # (P,)
    order = np.argsort(cell, kind="stable")
    pool, cell, w = pool[order], cell[order], w[order]
    mass = np.bincount(cell, weights=w, minlength=n_cells)  # (C,)
    cell_start = np.searchsorted(cell, np.arange(n_cells + 1))  # (C+1,)
    c_topic = np.arange(n_cells) // (2 * n_styles)
    c_style = (np.arange(n_cells) // 2) % n_styles
    c_cover = np.arange(n_cells) % 2
    with np.errstate(divide="ignore"):
        logw = clicks.topic * theta[:, c_topic] + _visual_logit(clicks, tau[:, c_style], c_cover) + np.log(mass)  # (U, C)
    prob = np.exp(logw - logw.max(axis=1, keepdims=True))
    cdf = np.cumsum(prob / prob.sum(axis=1, keepdims=True), axis=1)  # (U, C)
    flat = (cdf + np.arange(n_users)[:, None]).ravel()
    # Rounding can land a draw on an empty cell; move it to the nearest non-empty one below.
    nonempty = np.flatnonzero(mass > 0)
    nearest = nonempty[np.clip(np.searchsorted(nonempty, np.arange(n_cells), side="right") - 1, 0, None)]

    draws = np.where(lengths > 0, np.ceil(lengths * 1.5).astype(np.int64) + 2, 0)  # extra for repeats
    user = np.repeat(np.arange(n_users), draws)  # (D,)
    idx = np.searchsorted(flat, user + rng.random(len(user)), side="right") - user * n_cells
    c = nearest[np.clip(idx, 0, n_cells - 1)]
    cw = np.concatenate([[0.0], np.cumsum(w)])
    news = pool[_sample_in_ranges(rng, cw, cell_start[c], cell_start[c + 1])]  # (D,)
    # Keep each user's first draw of a news, then the first lengths[u] distinct ones.
    _, first = np.unique(user * len(topic) + news, return_index=True)
    first.sort()
    user, news = user[first], news[first]
    group_start = np.searchsorted(user, user, side="left")
    keep = (np.arange(len(user)) - group_start) < lengths[user]
    return user[keep], news[keep]


# ----------------------------------------------------------------------------- the world


@dataclass
class _World:
    """Every array of one generated world. News are indexed in publication order.

    Letters: N news, U users, M impressions (train, then dev, then test), T candidate rows,
    E history events (all users' ordered click sequences, concatenated).
    """

    news_ids: list[str]  # (N,)
    subcat: list[str]  # (N,)
    title: list[str]  # (N,)
    abstract: list[str]  # (N,), "" for some
    title_entities: list[str]  # (N,) MIND JSON
    abstract_entities: list[str]  # (N,) MIND JSON, "" where there is no abstract
    topic: np.ndarray  # (N,) int
    style: np.ndarray  # (N,) int
    cover: np.ndarray  # (N,) bool
    pop: np.ndarray  # (N,) float, popularity z
    pub: np.ndarray  # (N,) int64 unix seconds, ascending
    user_ids: list[str]  # (U,)
    theta: np.ndarray  # (U, K) topic interests
    tau: np.ndarray  # (U, S) visual taste
    base_len: np.ndarray  # (U,) clicks before train
    split: np.ndarray  # (M,) 0 train, 1 dev, 2 test
    imp_user: np.ndarray  # (M,)
    imp_time: np.ndarray  # (M,) int64
    offsets: np.ndarray  # (M+1,)
    items: np.ndarray  # (T,) news index
    p: np.ndarray  # (T,) true click probability
    p_text: np.ndarray  # (T,) the same without the two image terms
    p_presence: np.ndarray  # (T,) the same without the style term (cover presence kept)
    labels: np.ndarray  # (T,) bool
    forced: int  # impressions whose only click was forced
    bias: float
    seq_start: np.ndarray  # (U+1,) each user's slice of seq_news
    seq_news: np.ndarray  # (E,) clicked news, oldest first
    hist_len: np.ndarray  # (M,) how much of the user's sequence each impression sees


def _build(scale: Scale, seed: int, cover_rate: float, clicks: ClickModel = ClickModel()) -> _World:
    names = ("news", "users", "impressions", "candidates", "clicks", "histories", "ids", "text")
    # Independent streams per concern: e.g. --cover-rate or --no-images change no other draw.
    children = np.random.SeedSequence([GENERATOR_VERSION, seed]).spawn(len(names))
    rng = {name: np.random.default_rng(child) for name, child in zip(names, children)}
    n, n_users, n_topics, n_styles = scale.news, scale.users, len(TOPICS), WORLD.n_styles
    train_start = int(DEV_DAY.timestamp()) - scale.train_days * DAY
    test_end = int(DEV_DAY.timestamp()) + 2 * DAY
    fresh = int(WORLD.fresh_days * DAY)

    # News: hidden attributes, then sorted by publication time (candidate pools are ranges).
    r = rng["news"]
    topic = r.choice(n_topics, n, p=r.dirichlet(np.full(n_topics, 8.0)))
    style = r.integers(0, n_styles, n)
    cover = r.random(n) < cover_rate
    pop = r.standard_normal(n)
    n_pre = round(n * WORLD.pre_share)
    pub = np.concatenate([
        r.integers(train_start - scale.pre_days * DAY, train_start, n_pre),
        r.integers(train_start - fresh, test_end, n - n_pre),
    ])
    order = np.argsort(pub, kind="stable")
    topic, style, cover, pop, pub = topic[order], style[order], cover[order], pop[order], pub[order]

    # Users: interests, taste, activity, history length before train.
    r = rng["users"]
    theta = r.dirichlet(np.full(n_topics, WORLD.interest_alpha), n_users)  # (U, K)
    tau = r.dirichlet(np.full(n_styles, WORLD.taste_alpha), n_users)  # (U, S)
    activity = r.lognormal(0.0, 1.0, n_users)
    base_len = _lognormal_counts(r, scale.history_mean, 0.9, 5, scale.history_max, n_users)
    cold = r.random(n_users)
    few = r.integers(1, 5, n_users)
    base_len = np.where(cold < WORLD.cold_empty_share + WORLD.cold_few_share, few, base_len)
    base_len = np.where(cold < WORLD.cold_empty_share, 0, base_len)

    # Impressions: every user at least once (when there are enough), the rest by activity.
    r = rng["impressions"]
    sizes = (scale.train_impressions, scale.dev_impressions, scale.test_impressions)
    m = sum(sizes)
    split = np.repeat(np.arange(3), sizes)
    extra = r.choice(n_users, max(m - n_users, 0), p=activity / activity.sum())
    imp_user = r.permutation(np.concatenate([r.permutation(n_users)[: min(m, n_users)], extra]))
    day0 = np.array([train_start, int(DEV_DAY.timestamp()), int(DEV_DAY.timestamp()) + DAY])
    span = np.array([scale.train_days * DAY, DAY, DAY])
    imp_time = day0[split] + r.integers(0, span[split])
    counts = _lognormal_counts(
        r, scale.candidates_mean, scale.candidates_sigma, scale.candidates_min, scale.candidates_max, m
    )

    exposure = np.exp(WORLD.exposure_popularity * pop)  # (N,)
    offsets, items = _sample_candidates(rng["candidates"], pub, exposure, imp_time, counts, fresh)
    t = len(items)
    row_user = np.repeat(imp_user, np.diff(offsets))  # (T,)

    # The click model.
    r = rng["clicks"]
    topic_match = theta[row_user, topic[items]]  # (T,)
    visual_match = tau[row_user, style[items]]  # (T,)
    text_logit = clicks.topic * topic_match + clicks.popularity * pop[items] + r.normal(0.0, clicks.noise_sd, t)
    logit = text_logit + _visual_logit(clicks, visual_match, cover[items])
    bias = _solve_bias(logit, offsets, scale.target_ctr)
    p = _sigmoid(logit + bias)
    labels = r.random(t) < p
    forced = _force_one_click(r, offsets, p, labels)

    # Histories: pre-train clicks, then impression clicks, as one ordered sequence per user.
    older = np.flatnonzero(pub < train_start)
    hu, hn = _base_histories(rng["histories"], clicks, base_len, theta, tau, older, topic, style, cover, pop)
    clicked = np.flatnonzero(labels)
    cu, cn = row_user[clicked], items[clicked]
    c_split = split[np.repeat(np.arange(m), np.diff(offsets))[clicked]]
    c_time = np.repeat(imp_time, np.diff(offsets))[clicked]
    # When a click becomes visible: train clicks right after their impression, dev clicks
    # after the dev day (so dev histories stay fixed), test clicks never.
    horizon = np.int64(2**40 - 1)
    origin = train_start - scale.pre_days * DAY - DAY
    visible = np.where(c_split == 1, test_end - DAY - origin, horizon)
    visible = np.where(c_split == 0, c_time - origin + 1, visible)
    ev_user = np.concatenate([hu, cu])
    ev_news = np.concatenate([hn, cn])
    ev_visible = np.concatenate([np.zeros(len(hu), np.int64), visible])
    ev_when = np.concatenate([pub[hn] - origin, c_time - origin])  # order inside one visibility step
    ev_order = np.lexsort((np.arange(len(ev_user)), ev_when, ev_visible, ev_user))
    ev_user, ev_news, ev_visible = ev_user[ev_order], ev_news[ev_order], ev_visible[ev_order]
    # A news clicked twice (shown again later) stays at its first place in the sequence.
    _, first = np.unique(ev_user * n + ev_news, return_index=True)
    first.sort()
    ev_user, ev_news, ev_visible = ev_user[first], ev_news[first], ev_visible[first]
    seq_start = np.searchsorted(ev_user, np.arange(n_users + 1))
    key = ev_user * (horizon + 1) + ev_visible
    query = imp_user * (horizon + 1) + (imp_time - origin + 1)
    hist_len = np.searchsorted(key, query, side="left") - seq_start[imp_user]

    subcat, title, abstract, t_ents, a_ents = _news_texts(rng["text"], topic, vocabulary_entities())
    r = rng["ids"]
    news_num = r.permutation(2 * n)[:n] + 10_000
    user_num = r.permutation(2 * n_users)[:n_users] + 1
    return _World(
        news_ids=[f"N{x}" for x in news_num.tolist()], subcat=subcat, title=title, abstract=abstract,
        title_entities=t_ents, abstract_entities=a_ents, topic=topic, style=style, cover=cover, pop=pop, pub=pub,
        user_ids=[f"U{x}" for x in user_num.tolist()], theta=theta, tau=tau,
        base_len=np.bincount(hu, minlength=n_users), split=split, imp_user=imp_user, imp_time=imp_time,
        offsets=offsets, items=items, p=p, p_text=_sigmoid(text_logit + bias),
        p_presence=_sigmoid(text_logit + clicks.cover_effect * cover[items] + bias), labels=labels, forced=forced,
        bias=bias, seq_start=seq_start, seq_news=ev_news, hist_len=hist_len,
    )


# ----------------------------------------------------------------------------- writing


def _format_time(ts: int) -> str:
    """Unix seconds -> MIND's `11/11/2019 9:05:58 AM` (no zero padding of month, day, hour)."""
    d = datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)
    clock = f"{d.hour % 12 or 12}:{d.minute:02d}:{d.second:02d} {'AM' if d.hour < 12 else 'PM'}"
    return f"{d.month}/{d.day}/{d.year} {clock}"


def _write_text(path: Path, text: str) -> None:
    # newline="" keeps "\n" on every platform: the same seed must give the same bytes.
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def _render_chunk(job: tuple[int, str, list[tuple[int, str, str, str, int, int]]]) -> int:
    """Render and save one chunk of cards; runs in worker processes, so module level."""
    seed, folder, rows = job
    for index, news_id, title, category, topic, style in rows:
        # One stream per news: the bytes do not depend on chunking or worker count.
        rng = np.random.default_rng([GENERATOR_VERSION, seed, 7, index])
        card = render_card(title, category, draw_cover(topic, style, rng))
        card.save(Path(folder) / f"{news_id}.jpg", "JPEG", quality=JPEG_QUALITY)
    return len(rows)


def _write_images(folder: Path, seed: int, rows: list[tuple[int, str, str, str, int, int]], workers: int) -> None:
    from tqdm import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    chunk = 256
    jobs = [(seed, str(folder), rows[i : i + chunk]) for i in range(0, len(rows), chunk)]
    bar = tqdm(total=len(rows), desc="cards", unit="img", disable=True if len(rows) < 2000 else None)
    if workers > 1 and len(jobs) > 1:
        # spawn, not fork: safe whatever threads the caller (Prefect, torch) has started.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for done in pool.map(_render_chunk, jobs):
                bar.update(done)
    else:
        for job in jobs:
            bar.update(_render_chunk(job))
    bar.close()


def _dev_metrics(w: _World, seed: int) -> dict | None:
    """Oracle, text-only and presence-only oracles, random ranker on dev; None without rankers.metrics."""
    try:
        from rankers.metrics import evaluate
    except ImportError:
        return None
    dev = np.flatnonzero(w.split == 1)
    a, b = int(w.offsets[dev[0]]), int(w.offsets[dev[-1] + 1])
    offsets = w.offsets[dev[0] : dev[-1] + 2] - a  # (M_dev+1,)
    labels = w.labels[a:b].astype(np.int8)
    # Its own stream: the random ranker must not shift any draw that shapes the files.
    random_scores = np.random.default_rng([GENERATOR_VERSION, seed, 99]).random(b - a)
    out = {}
    oracles = (("oracle", w.p), ("oracle_text_only", w.p_text), ("oracle_presence", w.p_presence))
    for name, scores in (*((k, v[a:b]) for k, v in oracles), ("random", random_scores)):
        res = evaluate(offsets, labels, scores)
        out[name] = {k: round(float(res[k]), 6) for k in ("auc", "mrr", "ndcg@5", "ndcg@10")}
        out[name]["impressions"] = int(res["impressions"])
    return out


def _split_usage(w: _World) -> np.ndarray:
    """(3, N) bool: which news each split's behaviors reference (candidates and histories)."""
    n_users = len(w.user_ids)
    cand_split = np.repeat(w.split, np.diff(w.offsets))  # (T,)
    used = np.zeros((3, len(w.news_ids)), bool)
    for s in range(3):
        used[s, w.items[cand_split == s]] = True
        # A user's longest visible prefix in this split covers all their shorter ones.
        longest = np.zeros(n_users, np.int64)
        mask = w.split == s
        np.maximum.at(longest, w.imp_user[mask], w.hist_len[mask])
        edges = np.zeros(len(w.seq_news) + 1, np.int64)
        np.add.at(edges, w.seq_start[:-1], 1)
        np.add.at(edges, w.seq_start[:-1] + longest, -1)
        used[s, w.seq_news[np.cumsum(edges)[:-1] > 0]] = True
    return used


def _write_world(w: _World, out: Path, seed: int, images: bool, workers: int) -> dict:
    """Write every file but world.json; return the summary (counts, shares, means)."""
    n_news = len(w.news_ids)
    ids = np.array(w.news_ids, dtype=object)  # (N,)
    used = _split_usage(w)  # (3, N)
    in_world = used.any(axis=0)
    # Files list news in id order, not publication order, as nothing in MIND is sorted by time.
    by_id = sorted(np.flatnonzero(in_world).tolist(), key=lambda i: int(w.news_ids[i][1:]))
    category = [TOPICS[k][1] for k in w.topic.tolist()]
    news_line = {
        i: "\t".join((w.news_ids[i], category[i], w.subcat[i], w.title[i], w.abstract[i],
                      f"https://assets.example.com/mind-synthetic/{w.news_ids[i]}.html",
                      w.title_entities[i], w.abstract_entities[i]))
        for i in by_id
    }

    # History strings: per user the whole click sequence joined once; a history is a prefix.
    id_len = np.array([len(x) for x in w.news_ids], dtype=np.int64)
    bounds = zip(w.seq_start[:-1].tolist(), w.seq_start[1:].tolist())
    seq_str = [" ".join(ids[w.seq_news[a:b]].tolist()) for a, b in bounds]  # (U,)
    char_end = np.cumsum(id_len[w.seq_news] + 1)  # (E,) one past each token's trailing space
    user_char0 = np.concatenate([[0], char_end])[w.seq_start[:-1]]  # (U,)
    last = w.seq_start[w.imp_user] + w.hist_len - 1  # (M,) last visible event of each impression
    hist_chars = np.where(w.hist_len > 0, char_end[np.maximum(last, 0)] - user_char0[w.imp_user] - 1, 0)  # (M,)

    tok = np.array([f"{x}-{y}" for x in w.news_ids for y in (0, 1)], dtype=object)  # (2N,) id-label
    summary: dict = {"splits": {}}
    for s, name in enumerate(SPLITS):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        _write_text(folder / "news.tsv", "".join(news_line[i] + "\n" for i in by_id if used[s, i]))
        imps = np.flatnonzero(w.split == s)
        a, b = int(w.offsets[imps[0]]), int(w.offsets[imps[-1] + 1])
        offsets = w.offsets[imps[0] : imps[-1] + 2] - a  # (M_s+1,)
        items, labels = w.items[a:b], w.labels[a:b]
        # Test is unlabeled, like MIND-large test; its labels go to truth.txt.
        cand_tok = (ids[items] if name == "test" else tok[items * 2 + labels]).tolist()
        imp_ids = np.arange(1, len(imps) + 1)
        lines = []
        for j, (i, u) in enumerate(zip(imps.tolist(), w.imp_user[imps].tolist())):
            hist = seq_str[u][: hist_chars[i]]
            cands = " ".join(cand_tok[offsets[j] : offsets[j + 1]])
            lines.append(f"{j + 1}\t{w.user_ids[u]}\t{_format_time(int(w.imp_time[i]))}\t{hist}\t{cands}\n")
        _write_text(folder / "behaviors.tsv", "".join(lines))
        if name == "test":
            write_truth(folder / "truth.txt", imp_ids, offsets, labels.astype(np.int8))
        if name == "dev":
            write_values(folder / "click_probs.txt", imp_ids, offsets, w.p[a:b], decimals=6)
        h = w.hist_len[imps]
        summary["splits"][name] = {
            "impressions": len(imps),
            "users": int(len(np.unique(w.imp_user[imps]))),
            "news": int(used[s].sum()),
            "candidates": b - a,
            "clicks": int(labels.sum()),
            "ctr": round(float(labels.mean()), 6),
            "mean_candidates": round((b - a) / len(imps), 4),
            "mean_history": round(float(h.mean()), 4),
            "empty_history": int((h == 0).sum()),
            "history_1_to_4": int(((h >= 1) & (h <= 4)).sum()),
            "history_20_plus": int((h >= 20).sum()),
        }

    hidden = out / "hidden"
    hidden.mkdir(parents=True, exist_ok=True)
    head = "news_id\ttopic\ttopic_name\tvisual_style\tstyle_name\thas_cover\tpopularity\tpublished\n"
    rows = (
        f"{w.news_ids[i]}\t{k}\t{TOPICS[k][0]}\t{v}\t{STYLE_NAMES[v]}\t{int(w.cover[i])}\t{w.pop[i]:.4f}\t{w.pub[i]}\n"
        for i, k, v in ((i, int(w.topic[i]), int(w.style[i])) for i in by_id)
    )
    _write_text(hidden / "news.tsv", head + "".join(rows))
    seen = np.zeros(len(w.user_ids), bool)
    seen[w.imp_user] = True
    user_order = sorted(np.flatnonzero(seen).tolist(), key=lambda u: int(w.user_ids[u][1:]))
    def floats(v: np.ndarray) -> str:
        return ",".join(f"{x:.4f}" for x in v.tolist())

    rows = (f"{w.user_ids[u]}\t{floats(w.theta[u])}\t{floats(w.tau[u])}\t{w.base_len[u]}\n" for u in user_order)
    _write_text(hidden / "users.tsv", "user_id\tinterests\ttaste\thistory_before_train\n" + "".join(rows))

    with_cover = [i for i in by_id if w.cover[i]]
    if images:
        rows = [(i, w.news_ids[i], w.title[i], category[i], int(w.topic[i]), int(w.style[i])) for i in with_cover]
        _write_images(out / "images", seed, rows, workers)
    summary.update({
        "news": int(in_world.sum()),
        "news_generated": n_news,
        "users": int(seen.sum()),
        "cover_share": round(len(with_cover) / max(int(in_world.sum()), 1), 6),
        "images": len(with_cover) if images else 0,
        "forced_clicks": w.forced,
    })
    return summary


# ----------------------------------------------------------------------------- entry points

DESCRIPTION = (
    "Synthetic MIND + IM-MIND world. Topics set categories, subcategories, title words and "
    "entities; every news has a visual style (a shape on its cover) that no text reveals; "
    "44% of news have a cover by default. Users have Dirichlet topic interests and a Dirichlet "
    "visual taste. Clicks follow the click model below, where a cover acts through two separate "
    "terms: cover_effect (presence alone) and visual_weight (the user's taste for the cover's "
    "style, centred so that it averages to zero over styles); an impression without a sampled click "
    "gets one, picked in proportion to p. dev/click_probs.txt holds the true p of every dev "
    "candidate; hidden/ holds the hidden attributes of news and users."
)


def _params(scale: Scale, seed: int, images: bool, cover_rate: float, clicks: ClickModel) -> dict:
    """What a world depends on; a world on disk with equal params is the same bytes."""
    return {
        "generator_version": GENERATOR_VERSION,
        "scale": scale.name,
        "seed": seed,
        "images": images,
        "cover_rate": cover_rate,
        "cover_effect": clicks.cover_effect,
        "visual_weight": clicks.visual_weight,
        "config": {"scale": asdict(scale), "world": asdict(WORLD), "click_model": asdict(clicks)},
    }


def _click_model_json(clicks: ClickModel, bias: float) -> dict:
    return {
        "formula": (
            "p = sigmoid(topic * topic_match + visual_weight * (visual_match - visual_centre) * has_cover"
            " + cover_effect * has_cover + popularity * popularity_z + bias + noise)"
        ),
        "topic": clicks.topic,
        "visual_weight": clicks.visual_weight,
        "visual_centre": clicks.visual_centre,
        "cover_effect": clicks.cover_effect,
        "popularity": clicks.popularity,
        "noise_sd": clicks.noise_sd,
        "bias": round(bias, 6),
        "terms": {
            "topic_match": "the user's interest share theta_u[topic_n] in the news' topic (theta_u ~ Dirichlet(0.3) over 16 topics)",
            "visual_match": "the user's taste share tau_u[style_n] for the cover's style (tau_u ~ Dirichlet(0.5) over 5 styles)",
            "visual_centre": (
                "1 / number of styles: the mean of tau_u over the styles for every user (tau_u sums to 1), and so the "
                "population mean of visual_match over (user, covered news) pairs (styles are uniform and independent "
                "of users); the style term averages to zero and only moves clicks between covered news"
            ),
            "visual_weight": "the taste-dependent effect of the cover's content (0: the style does not matter)",
            "cover_effect": "a logit bonus for having any cover, whatever its style (0: presence alone does not matter)",
            "defaults": "visual_weight 4 and cover_effect 4 * visual_centre = 0.8 split the former term 4 * visual_match * has_cover exactly",
            "has_cover": "1 when the news has a cover image, else 0: without a cover no style is seen",
            "popularity_z": "the news' popularity, N(0, 1); candidates are also shown in proportion to exp(0.6 z)",
            "noise": "N(0, noise_sd) per candidate row, included in dev/click_probs.txt",
            "bias": "solved so that the expected CTR, forced clicks included, equals the scale's target_ctr",
        },
        "forced_click": "an impression whose Bernoulli draws give no click gets one, chosen among its candidates in proportion to p",
        "oracles": (
            "summary.dev_metrics: oracle ranks by p; oracle_text_only by p without the two image terms; "
            "oracle_presence by p without the style term (cover_effect kept)"
        ),
        "histories": (
            "pre-train clicks ~ exp(topic*topic_match + visual_weight*(visual_match - visual_centre)*has_cover"
            " + cover_effect*has_cover + (popularity + 0.6)*z); then train clicks as they happen; dev sees all train"
            " clicks, test sees train and dev"
        ),
    }


GENERATING = ".generating"
"""Marker of a generation in a world folder: created first, locked while it runs, removed last."""


class _Generation:
    """The exclusive right to write a world into `out`: an flock on its `.generating` marker.

    A second process asking while one generates gets a one-line error. A marker found
    unlocked is what a killed or crashed generation left: `clear()` removes that run's files
    (the marker says they are the generator's), and the generator, being deterministic, then
    writes exactly the world the interrupted run would have.
    """

    def __init__(self, out: Path):
        self.out, self.marker, self.fd = out, out / GENERATING, None

    def __enter__(self) -> _Generation:
        self.out.mkdir(parents=True, exist_ok=True)
        self.fd = lock_exclusively(self.marker, f"{self.out}: another process is generating a world there (it "
                                                f"holds {self.marker}); wait for it to finish")
        return self

    def clear(self) -> None:
        """Remove what an interrupted generation left (everything but the marker)."""
        leftovers = [c for c in self.out.iterdir() if c.name != GENERATING]
        if leftovers:
            log.warning("%s holds an interrupted generation; starting it again", self.out)
        for child in leftovers:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()

    def done(self) -> None:
        """The world is complete (world.json written): remove the marker."""
        self.marker.unlink(missing_ok=True)

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _check_out(out: Path, params: dict) -> dict | None:
    """The stored world.json when `out` already holds this world; raise when out is taken."""
    marker = out / "world.json"
    if marker.is_file():
        try:
            stored = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise PipelineError(f"{marker}: unreadable ({err}); delete {out} or choose another --out") from err
        if stored.get("params") == json.loads(json.dumps(params)):
            with contextlib.suppress(OSError):  # killed between world.json and the marker's removal
                (out / GENERATING).unlink(missing_ok=True)
            return stored
        theirs = stored.get("params", {})
        diff = ", ".join(f"{k}={theirs.get(k)!r} (asked {v!r})" for k, v in params.items() if theirs.get(k) != v)
        raise PipelineError(
            f"{out} already holds a synthetic world with other parameters: {diff or 'the generator config'}; "
            f"choose another --out or delete {out}"
        )
    if out.exists() and not out.is_dir():
        raise PipelineError(f"{out} is a file, not a folder; choose another --out")
    if (out / GENERATING).is_file():
        return None  # a generation of ours, interrupted or running: _Generation sorts out which
    if out.is_dir() and any(out.iterdir()):
        raise PipelineError(
            f"{out} is not empty and holds no world.json (files that are not a synthetic world); "
            f"choose another --out or delete {out}"
        )
    return None


def generate_world(
    out: str | os.PathLike[str],
    scale: str = "tiny",
    seed: int = 0,
    images: bool = True,
    cover_rate: float | None = None,
    workers: int | None = None,
    *,
    cover_effect: float | None = None,
    visual_weight: float | None = None,
) -> dict:
    """Generate (or find already generated) the world `scale`/`seed` in `out`; return its summary.

    `cover_rate` defaults to 0.44 (IM-MIND's share of news with an image). `cover_effect`
    (default 0.8: the logit bonus of having any cover) and `visual_weight` (default 4: the
    weight of the user's taste for the cover's style, centred) set the two image terms of
    the click model; 0 and 0 give a world where images carry nothing. `workers` processes
    render the cards (default: the CPU count, capped at 8; small jobs stay in-process).
    The summary holds per-split counts, cover share, CTR and means, the dev metrics of the
    oracle, text-only oracle and a random ranker, `out`, and `skipped` (True when `out`
    already held this world and nothing was written). A generation killed or crashed part way
    is started again by the next call (its folder is marked `.generating` until world.json is
    written): the generator is deterministic, so the world is the same.
    """
    if scale not in SCALES:
        raise PipelineError(f"unknown scale {scale!r}; known: {', '.join(SCALES)}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise PipelineError(f"seed must be a non-negative integer, got {seed!r}")
    rate = WORLD.cover_rate if cover_rate is None else float(cover_rate)
    if not 0.0 <= rate <= 1.0:
        raise PipelineError(f"cover rate must lie in [0, 1], got {cover_rate!r}")
    knobs = {}
    for name, value in (("cover_effect", cover_effect), ("visual_weight", visual_weight)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
            raise PipelineError(f"{name} must be a finite number, got {value!r}")
        if not -20.0 <= float(value) <= 20.0:
            raise PipelineError(f"{name} must lie in [-20, 20] (a logit weight), got {value!r}")
        knobs[name] = float(value)
    clicks = replace(CLICKS, **knobs)
    cfg = SCALES[scale]
    out = Path(out)
    params = _params(cfg, int(seed), bool(images), rate, clicks)
    stored = _check_out(out, params)
    if stored is not None:
        return {**stored["summary"], "out": str(out), "skipped": True}

    world = _build(cfg, int(seed), rate, clicks)
    n_workers = max(1, workers if workers is not None else min(os.cpu_count() or 1, 8))
    with _Generation(out) as generation:
        stored = _check_out(out, params)  # again, under the lock: another process may have just finished it
        if stored is not None:
            generation.done()
            return {**stored["summary"], "out": str(out), "skipped": True}
        generation.clear()
        summary = {"scale": scale, "seed": int(seed), **_write_world(world, out, int(seed), bool(images), n_workers)}
        summary["dev_metrics"] = _dev_metrics(world, int(seed))
        dev0 = int(DEV_DAY.timestamp())
        doc = {
            "format": "mmnews synthetic MIND + IM-MIND world",
            "params": params,
            "description": DESCRIPTION,
            "click_model": _click_model_json(clicks, world.bias),
            "topics": [{"id": k, "name": t[0], "category": t[1], "subcategories": list(t[2])} for k, t in enumerate(TOPICS)],
            "visual_styles": list(STYLE_NAMES[: WORLD.n_styles]),
            "start": {name: _format_time(dev0 + d * DAY) for name, d in zip(SPLITS, (-cfg.train_days, 0, 1))},
            "summary": summary,
        }
        # Written last, through a temporary name: its presence means the world is complete.
        tmp = out / "world.json.tmp"
        _write_text(tmp, json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, out / "world.json")
        generation.done()
    return {**summary, "out": str(out), "skipped": False}


def format_summary(summary: dict) -> str:
    """The human-readable report the command line prints."""
    lines = [f"synthetic world {summary['scale']} (seed {summary['seed']}) in {summary['out']}"]
    lines.append(f"news {summary['news']:,}  users {summary['users']:,}  cover share {summary['cover_share']:.1%}  images {summary['images']:,}")
    head = f"{'split':<6}{'impr.':>9}{'users':>8}{'news':>8}{'cands':>11}{'clicks':>9}{'CTR':>8}{'cand/imp':>10}{'hist/imp':>10}{'no hist':>9}"
    lines.append(head)
    for name, s in summary["splits"].items():
        lines.append(
            f"{name:<6}{s['impressions']:>9,}{s['users']:>8,}{s['news']:>8,}{s['candidates']:>11,}{s['clicks']:>9,}"
            f"{s['ctr']:>8.2%}{s['mean_candidates']:>10.1f}{s['mean_history']:>10.1f}{s['empty_history']:>9,}"
        )
    metrics = summary.get("dev_metrics")
    if metrics is None:
        lines.append("dev metrics: not computed (rankers.metrics was not importable when the world was generated)")
    else:
        lines.append(f"{'dev ranking':<18}{'AUC':>8}{'MRR':>8}{'nDCG@5':>8}{'nDCG@10':>9}")
        for name, r in metrics.items():
            lines.append(f"{name:<18}{r['auc']:>8.4f}{r['mrr']:>8.4f}{r['ndcg@5']:>8.4f}{r['ndcg@10']:>9.4f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    scales = "\n".join(
        f"  {s.name:<11} {s.news:>6,} news, {s.users:>6,} users, {s.train_impressions:,}/{s.dev_impressions:,}/"
        f"{s.test_impressions:,} train/dev/test impressions, ~{s.candidates_mean:g} candidates, CTR ~{s.target_ctr:.0%}"
        for s in SCALES.values()
    )
    parser = argparse.ArgumentParser(
        prog="python -m storage.synthetic",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Generate a synthetic world shaped exactly like MIND + IM-MIND, with known ground truth.\n\n"
            "Writes OUT/{train,dev,test}/{news.tsv,behaviors.tsv} (test unlabeled, its labels in\n"
            "test/truth.txt), OUT/images/<news_id>.jpg (610x195 impression cards, only for news with\n"
            "a cover), OUT/dev/click_probs.txt (the true click probability of every dev candidate),\n"
            "OUT/hidden/{news,users}.tsv (topics, visual styles, interests, tastes) and, last,\n"
            "OUT/world.json (parameters, click model, counts, dev metrics).\n\n"
            f"Click model: p = sigmoid({CLICKS.topic:g} * topic_match\n"
            f"             + visual_weight * (visual_match - {CLICKS.visual_centre:g}) * has_cover\n"
            f"             + cover_effect * has_cover\n"
            f"             + {CLICKS.popularity:g} * popularity + bias + N(0, {CLICKS.noise_sd:g})).\n"
            "visual_match is the user's taste share for the cover's style; centred on its mean over\n"
            "styles (1/5, the same for every user), the style term averages to zero, so presence\n"
            "alone acts only through cover_effect. The defaults (visual_weight 4, cover_effect 0.8)\n"
            "split the former 4 * visual_match * has_cover exactly; 0 and 0 give a null world where\n"
            "images carry nothing, cover_effect > 0 with visual_weight 0 a presence-only world.\n"
            "The visual style (a shape on the cover) appears in no text, so a ranker that sees the\n"
            "images can beat one that sees text only; the summary shows the oracle, the text-only\n"
            "oracle, the presence-only oracle (no style) and a random ranker on dev.\n\n"
            "The same --scale/--seed give byte-identical files. A folder that already holds the\n"
            "same world is left alone (its summary is printed); any other non-empty folder is refused."
        ),
        epilog="scales:\n" + scales,
    )
    parser.add_argument("--out", required=True, help="folder to create (must be empty, missing, or hold this very world)")
    parser.add_argument(
        "--scale", default="small", choices=list(SCALES),
        help="world size (default: small; tiny is for tests, mind-small has MIND-small's counts)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0); the same seed gives byte-identical files")
    parser.add_argument("--no-images", action="store_true", help="skip rendering the impression cards (much faster at mind-small)")
    parser.add_argument(
        "--cover-rate", type=float, default=None, metavar="F",
        help=f"share of news with a cover image (default {WORLD.cover_rate}, as IM-MIND)",
    )
    parser.add_argument(
        "--cover-effect", type=float, default=None, metavar="E",
        help=f"logit bonus for having any cover, whatever its style (default {CLICKS.cover_effect:g}; 0: presence alone does nothing)",
    )
    parser.add_argument(
        "--visual-weight", type=float, default=None, metavar="W",
        help=f"weight of the user's centred taste for the cover's style (default {CLICKS.visual_weight:g}; 0: the style does nothing)",
    )
    parser.add_argument("--workers", type=int, default=None, help="processes rendering cards (default: CPU count, at most 8)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    summary = generate_world(
        args.out, args.scale, args.seed, images=not args.no_images, cover_rate=args.cover_rate, workers=args.workers,
        cover_effect=args.cover_effect, visual_weight=args.visual_weight,
    )
    print(format_summary(summary))
    if summary["skipped"]:
        print(f"already there: {args.out}/world.json matches these parameters; nothing regenerated")
    else:
        print(f"generated in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
