"""MIND readers: `news.tsv` and `behaviors.tsv` into columnar numpy arrays.

One code path reads the real MIND splits and the project's synthetic world. Results are
columns (one array per field, ragged lists as offsets + items) plus a news id -> row index
dict, never one Python object per row, so MIND-large fits in memory and later stages can
slice instead of loop.

Letters: N news, M impressions, T candidate rows (all impressions), H history items.

Formats (no header, tab-separated, UTF-8):
- news.tsv, 8 columns: news_id, category, subcategory, title, abstract, url,
  title_entities, abstract_entities (JSON lists; may be empty, kept as raw text).
- behaviors.tsv, 5 columns: impression_id, user_id, time (`11/11/2019 9:05:58 AM`),
  history (space-separated news ids, may be empty), impressions (`N1-1 N2-0 ...`, or
  `N1 N2 ...` in an unlabeled split such as MIND-large test). A file is all labeled or all
  unlabeled; the first candidate of the first row decides which.
- a titles file (`read_titles`, GENRE's enhanced titles), 2 columns: news_id, title.

Validation is strict by default: the first malformed row raises `DataFormatError`
(`path:line: what is wrong; what to do`). With `strict=False` bad rows are skipped, unknown
ids are dropped from histories, and a `ReadReport` counts both by reason.

Speed comes from checking in bulk: each chunk of rows is parsed with whole-column string
operations, labels are read from the bytes before each separator, and news ids are matched
on the raw bytes through a numpy hash table (`_NewsKeys`). Only when a bulk check fails is
the chunk walked row by row with the same rules, which finds the exact line (strict) or
the rows to skip (lenient). A MIND-small train split reads in a few seconds on 2 cores
(benchmarks/parse.py).

Command line: `python -m storage.mind validate PATH [--lenient] [--json]`.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from storage.errors import DataFormatError, PipelineError, run_cli

NEWS_COLUMNS = 8
BEHAVIOR_COLUMNS = 5
TIME_FORMAT_HINT = "M/D/YYYY H:MM:SS AM|PM, e.g. 11/11/2019 9:05:58 AM"
SPLIT_NAMES = ("train", "dev", "test")

# Rows are parsed in chunks so the temporary per-token lists stay small on MIND-large
# (83.5M candidates would otherwise need several GB of str objects at once).
_CHUNK_ROWS = 50_000
_INT64_MAX = 2**63 - 1
_EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()
_SPACE, _DASH, _ZERO = ord(" "), ord("-"), ord("0")

# Reasons a row is rejected (strict) or skipped (lenient), with what the user can do.
BAD_COLUMNS = "wrong column count"
NOT_UTF8 = "bytes that are not UTF-8"
BAD_NEWS_ID = "bad news id"
DUPLICATE_NEWS_ID = "duplicate news id"
BAD_IMPRESSION_ID = "bad impression id"
DUPLICATE_IMPRESSION_ID = "duplicate impression id"
EMPTY_USER_ID = "empty user id"
BAD_TIME = "bad time"
BAD_CANDIDATE = "bad candidate token"
MIXED_LABELS = "labeled and unlabeled candidates mixed"
UNKNOWN_CANDIDATE = "unknown news id in candidates"
EMPTY_HISTORY_TOKEN = "empty history token"
UNKNOWN_HISTORY = "unknown news id in history"

_SKIP_HINT = "or pass --lenient / strict=False to skip such rows"
_ADVICE = {
    BAD_COLUMNS: f"fix or delete the line ({_SKIP_HINT})",
    NOT_UTF8: f"re-encode the file as UTF-8 ({_SKIP_HINT})",
    BAD_NEWS_ID: f"give every news row a non-empty id without spaces ({_SKIP_HINT})",
    DUPLICATE_NEWS_ID: f"keep one row per news id ({_SKIP_HINT}; the first row is kept)",
    BAD_IMPRESSION_ID: f"impression ids must be non-negative integers ({_SKIP_HINT})",
    DUPLICATE_IMPRESSION_ID: f"impression ids must be unique ({_SKIP_HINT}; the first is kept)",
    EMPTY_USER_ID: f"fill in the user id ({_SKIP_HINT})",
    BAD_TIME: f"write times as {TIME_FORMAT_HINT} ({_SKIP_HINT})",
    BAD_CANDIDATE: "write candidates as NEWSID-1 / NEWSID-0 separated by single spaces "
    f"({_SKIP_HINT})",
    MIXED_LABELS: f"label every candidate of the file or none of them ({_SKIP_HINT})",
    UNKNOWN_CANDIDATE: "check that news.tsv comes from the same split as behaviors.tsv "
    f"({_SKIP_HINT})",
    EMPTY_HISTORY_TOKEN: "separate history ids by single spaces, without leading or trailing "
    "spaces (or pass --lenient / strict=False to drop the empty tokens)",
    UNKNOWN_HISTORY: "check that news.tsv comes from the same split as behaviors.tsv "
    "(or pass --lenient / strict=False to drop unknown ids from histories)",
}


class Problem(NamedTuple):
    """One rejected row or dropped id, for the report's examples."""

    path: str
    line: int
    reason: str
    detail: str


@dataclass
class ReadReport:
    """What lenient reading skipped or dropped, by reason, with the first few examples.

    `skipped`: rows left out, by reason. `dropped`: ids removed from rows that were kept
    (unknown or empty history tokens), by reason. `missing_ids`: every distinct id that
    behaviors.tsv refers to (in a history or as a candidate) and news.tsv lacks, from every row
    with five columns, whether the row was kept or skipped (and for whatever reason).
    """

    max_examples: int = 3  # per reason
    skipped: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    missing_ids: set[str] = field(default_factory=set)
    examples: list[Problem] = field(default_factory=list)

    def skip(self, path: str, line: int, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        self._example(Problem(path, line, reason, detail))

    def drop(self, path: str, line: int, reason: str, detail: str, count: int = 1) -> None:
        self.dropped[reason] += count
        self._example(Problem(path, line, reason, detail))

    def _example(self, problem: Problem) -> None:
        if sum(e.reason == problem.reason for e in self.examples) < self.max_examples:
            self.examples.append(problem)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())

    def __bool__(self) -> bool:
        return bool(self.skipped or self.dropped)

    def lines(self) -> list[str]:
        """Human-readable summary: one line per reason, then the examples."""
        if not self:
            return ["nothing skipped"]
        out = [f"skipped {n:,} row(s): {why}" for why, n in sorted(self.skipped.items())]
        out += [f"dropped {n:,} id(s): {why}" for why, n in sorted(self.dropped.items())]
        out += [f"  e.g. {e.path}:{e.line}: {e.detail}" for e in self.examples]
        return out

    def to_dict(self) -> dict:
        return {
            "skipped_rows": dict(self.skipped),
            "dropped_ids": dict(self.dropped),
            "missing_ids": len(self.missing_ids),
            "examples": [e._asdict() for e in self.examples],
        }


def _reject(
    strict: bool, report: ReadReport, path: str, line: int, reason: str, detail: str
) -> None:
    """Strict: raise at this line. Lenient: count the skipped row."""
    if strict:
        raise DataFormatError(path, line, f"{detail}; {_ADVICE[reason]}")
    report.skip(path, line, reason, detail)


# ---------------------------------------------------------------- reading lines


def _read_lines(
    path: Path, strict: bool, report: ReadReport, what: str
) -> tuple[list[str], list[int]]:
    """The file's lines (without line ends) and their 1-based line numbers."""
    if not path.is_file():
        raise PipelineError(
            f"{path}: no such file; expected the MIND {what} (a split folder holds "
            "news.tsv and behaviors.tsv)"
        )
    data = path.read_bytes()
    if not data:
        raise DataFormatError(
            path, 1, f"the file is empty; expected the MIND {what} (download or copy it again)"
        )
    try:
        # "utf-8-sig" drops the byte order mark some Windows editors prepend.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        if strict:
            decoded = err.object  # positions count from after a byte order mark
            line = decoded.count(b"\n", 0, err.start) + 1
            column = err.start - (decoded.rfind(b"\n", 0, err.start) + 1) + 1
            detail = f"byte 0x{decoded[err.start]:02x} at column {column} is not valid UTF-8"
            raise DataFormatError(path, line, f"{detail}; {_ADVICE[NOT_UTF8]}") from None
        return _decode_by_line(data, str(path), report)
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start a new one
    return lines, list(range(1, len(lines) + 1))


def _decode_by_line(data: bytes, path: str, report: ReadReport) -> tuple[list[str], list[int]]:
    """Lenient decoding: lines that are not UTF-8 are skipped and counted."""
    raw_lines = data.split(b"\n")
    if raw_lines[-1] == b"":
        raw_lines.pop()
    lines: list[str] = []
    numbers: list[int] = []
    for number, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            byte = err.object[err.start]  # err.object: the line after a byte order mark
            detail = f"byte 0x{byte:02x} at column {err.start + 1} is not valid UTF-8"
            report.skip(path, number, NOT_UTF8, detail)
            continue
        lines.append(line[:-1] if line.endswith("\r") else line)
        numbers.append(number)
    return lines, numbers


# ---------------------------------------------------------------- news.tsv


@dataclass(frozen=True, eq=False)
class News:
    """news.tsv as columns; row i is news `ids[i]`, and `index[ids[i]] == i`.

    Every column is an (N,) object array of str; the entity columns hold the raw JSON text
    (parse one row with `entities`). `lines` (N,) int32 is each row's line in the file.
    """

    path: str
    ids: np.ndarray  # (N,) object str
    index: dict[str, int]  # news id -> row
    category: np.ndarray  # (N,) object str
    subcategory: np.ndarray  # (N,) object str
    title: np.ndarray  # (N,) object str
    abstract: np.ndarray  # (N,) object str, "" when missing
    url: np.ndarray  # (N,) object str
    title_entities: np.ndarray  # (N,) object str, raw JSON or ""
    abstract_entities: np.ndarray  # (N,) object str, raw JSON or ""
    lines: np.ndarray  # (N,) int32, 1-based line in news.tsv

    def __len__(self) -> int:
        return len(self.ids)

    def entities(self, i: int, field: str = "title") -> list[dict]:
        """The parsed entity list of row i's title or abstract (empty text -> [])."""
        if field not in ("title", "abstract"):
            raise ValueError(f"field must be 'title' or 'abstract', not {field!r}")
        raw = (self.title_entities if field == "title" else self.abstract_entities)[i]
        if not raw.strip():
            return []
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataFormatError(
                self.path,
                int(self.lines[i]),
                f"{field}_entities of news {self.ids[i]} is not valid JSON ({err.msg}); "
                "expected a JSON list of entity objects, or an empty column",
            ) from None
        if not isinstance(parsed, list):
            raise DataFormatError(
                self.path,
                int(self.lines[i]),
                f"{field}_entities of news {self.ids[i]} is a JSON {type(parsed).__name__}, "
                "expected a list of entity objects",
            )
        return parsed

    def fingerprint(self) -> str:
        """sha256 hex over ids, category, subcategory, title and abstract, in row order.

        Feature stores record it to prove their vectors belong to this news table. Fields
        cannot contain tabs or newlines (they are the separators), so the encoding is
        unambiguous.
        """
        digest = hashlib.sha256(b"mind-news-v1\n")
        for row in zip(self.ids, self.category, self.subcategory, self.title, self.abstract):
            digest.update("\t".join(row).encode("utf-8"))
            digest.update(b"\n")
        return digest.hexdigest()


def _valid_news_id(news_id: str) -> bool:
    # Ids are joined by spaces in behaviors.tsv, so they cannot contain whitespace; NUL is
    # the padding of the fixed-width keys that behaviors.tsv tokens are matched against.
    return bool(news_id) and news_id.split() == [news_id] and "\0" not in news_id


def read_news(
    path: str | Path, *, strict: bool = True, report: ReadReport | None = None
) -> News:
    """Read news.tsv. Strict: the first bad row raises DataFormatError. Lenient: skipped."""
    path = Path(path)
    report = report if report is not None else ReadReport()
    lines, numbers = _read_lines(path, strict, report, "news table news.tsv")
    rows = [line.split("\t") for line in lines]
    ids = [row[0] for row in rows]
    ok = all(len(row) == NEWS_COLUMNS for row in rows) and all(map(_valid_news_id, ids))
    index = dict(zip(ids, range(len(ids)))) if ok else {}
    if not ok or len(index) != len(ids):
        rows, numbers = _clean_news_rows(rows, numbers, str(path), strict, report)
        ids = [row[0] for row in rows]
        index = dict(zip(ids, range(len(ids))))
    columns = list(zip(*rows)) if rows else [()] * NEWS_COLUMNS

    def column(j: int) -> np.ndarray:
        out = np.empty(len(rows), dtype=object)  # (N,); np.array(list) could make 2-D arrays
        out[:] = columns[j]
        return out

    return News(
        path=str(path),
        ids=column(0),
        index=index,
        category=column(1),
        subcategory=column(2),
        title=column(3),
        abstract=column(4),
        url=column(5),
        title_entities=column(6),
        abstract_entities=column(7),
        lines=np.asarray(numbers, dtype=np.int32),
    )


def _clean_news_rows(
    rows: list[list[str]], numbers: list[int], path: str, strict: bool, report: ReadReport
) -> tuple[list[list[str]], list[int]]:
    """Row by row: raise at the first bad row (strict) or keep only the good ones."""
    kept: list[list[str]] = []
    kept_numbers: list[int] = []
    first_line: dict[str, int] = {}
    for row, number in zip(rows, numbers):
        if len(row) != NEWS_COLUMNS:
            found = "an empty line" if row == [""] else f"{len(row)}"
            detail = f"expected {NEWS_COLUMNS} tab-separated columns, found {found}"
            _reject(strict, report, path, number, BAD_COLUMNS, detail)
        elif not _valid_news_id(row[0]):
            detail = f"news id {row[0]!r} is empty or contains whitespace or NUL"
            _reject(strict, report, path, number, BAD_NEWS_ID, detail)
        elif row[0] in first_line:
            detail = f"news id {row[0]} already appears on line {first_line[row[0]]}"
            _reject(strict, report, path, number, DUPLICATE_NEWS_ID, detail)
        else:
            first_line[row[0]] = number
            kept.append(row)
            kept_numbers.append(number)
    return kept, kept_numbers


# ---------------------------------------------------------------- enhanced titles


def read_titles(path: str | Path, known: Mapping[str, int] | None = None) -> dict[str, str]:
    """A titles file (GENRE's "enhanced titles"): one `news_id<TAB>title` per line, UTF-8,
    no header -> {news_id: title}. News it leaves out keep their original titles.

    Strict: a malformed line raises `DataFormatError` (`path:line: ...`): a column count other
    than 2, a bad news id, an empty title, a news id listed twice. With `known` (a dataset's
    news id index), ids the dataset lacks are an error naming them."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"titles file {path} does not exist; give a file of news_id<TAB>title lines, "
                            "one per news whose title it replaces")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(path, data[: err.start].count(b"\n") + 1,
                              "bytes that are not UTF-8; re-encode the titles file as UTF-8") from None
    lines = text.removeprefix("\ufeff").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    titles: dict[str, str] = {}
    first: dict[str, int] = {}
    unknown: list[tuple[int, str]] = []
    for no, line in enumerate(lines, 1):
        parts = line.removesuffix("\r").split("\t")
        if len(parts) != 2:
            found = "an empty line" if not line.strip() else f"{len(parts)} columns"
            raise DataFormatError(path, no, f"expected 2 tab-separated columns, news_id<TAB>title, found {found}")
        news_id, title = parts
        if not _valid_news_id(news_id):
            raise DataFormatError(path, no, f"bad news id {news_id!r}: expected a non-empty id without spaces, "
                                  "as in news.tsv")
        if not title.strip():
            raise DataFormatError(path, no, f"empty title for {news_id}; give it a title, or leave its line out "
                                  "to keep the original")
        if news_id in first:
            raise DataFormatError(path, no, f"duplicate news id {news_id} (first at line {first[news_id]}); "
                                  "give each news one title")
        first[news_id] = no
        if known is not None and news_id not in known:
            unknown.append((no, news_id))
        titles[news_id] = title
    if unknown:
        shown = ", ".join(n for _, n in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise DataFormatError(path, unknown[0][0], f"news id {unknown[0][1]} is not in the dataset's news.tsv "
                              f"({len(unknown)} unknown in all: {shown}); check that the titles file belongs to "
                              "this dataset, or remove those lines")
    if not titles:
        raise PipelineError(f"{path}: no titles; expected news_id<TAB>title lines")
    return titles


# ---------------------------------------------------------------- behaviors.tsv


@dataclass(frozen=True, eq=False)
class Behaviors:
    """behaviors.tsv as columns. Ragged lists are offsets + items: impression i's history
    is `hist_items[hist_offsets[i]:hist_offsets[i + 1]]` (news indices, oldest first) and its
    candidates are `cand_items[cand_offsets[i]:cand_offsets[i + 1]]` with `labels` alongside
    (1 click, 0 no click, -1 everywhere when the split is unlabeled).
    """

    path: str
    impression_ids: np.ndarray  # (M,) int64
    user_ids: np.ndarray  # (M,) object str
    times: np.ndarray  # (M,) int64 unix seconds, naive UTC
    hist_offsets: np.ndarray  # (M+1,) int64
    hist_items: np.ndarray  # (H,) int32
    cand_offsets: np.ndarray  # (M+1,) int64
    cand_items: np.ndarray  # (T,) int32
    labels: np.ndarray  # (T,) int8
    labeled: bool

    def __len__(self) -> int:
        return len(self.impression_ids)

    @property
    def n_impressions(self) -> int:
        return len(self.impression_ids)

    @property
    def n_candidates(self) -> int:
        return len(self.cand_items)

    def histories(self, i: int) -> np.ndarray:
        """Impression i's clicked history, news indices, oldest first: (h_i,) int32 view."""
        return self.hist_items[self.hist_offsets[i] : self.hist_offsets[i + 1]]

    def candidates(self, i: int) -> np.ndarray:
        """Impression i's candidates, news indices in file order: (c_i,) int32 view."""
        return self.cand_items[self.cand_offsets[i] : self.cand_offsets[i + 1]]

    def candidate_labels(self, i: int) -> np.ndarray:
        """Impression i's labels aligned with `candidates(i)`: (c_i,) int8 view."""
        return self.labels[self.cand_offsets[i] : self.cand_offsets[i + 1]]

    def users(self) -> np.ndarray:
        """The distinct user ids, sorted: (U,) object str."""
        return np.unique(self.user_ids)


class _Chunk(NamedTuple):
    impression_ids: np.ndarray  # (m,) int64
    user_ids: tuple[str, ...]  # (m,)
    times: np.ndarray  # (m,) int64
    hist_lengths: np.ndarray  # (m,) int64
    hist_items: np.ndarray  # (h,) int32
    cand_lengths: np.ndarray  # (m,) int64
    cand_items: np.ndarray  # (t,) int32
    labels: np.ndarray  # (t,) int8


def _parse_date(text: str) -> int | None:
    """`11/11/2019` (month/day/year) -> days since 1970-01-01; None if malformed."""
    fields = text.split("/")
    # int() alone would also accept "+5", " 5", "1_0" and non-ASCII digits.
    if len(fields) != 3 or not all(f.isascii() and f.isdigit() for f in fields):
        return None
    if len(fields[0]) > 2 or len(fields[1]) > 2 or len(fields[2]) != 4:
        return None
    month, day, year = map(int, fields)
    try:
        return datetime.date(year, month, day).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        return None


def _parse_clock(text: str) -> int | None:
    """`9:05:58 AM` (12-hour clock) -> seconds since midnight; None if malformed."""
    clock, _, half = text.partition(" ")
    fields = clock.split(":")
    if half not in ("AM", "PM") or len(fields) != 3:
        return None
    if not all(f.isascii() and f.isdigit() and len(f) <= 2 for f in fields):
        return None
    hour, minute, second = map(int, fields)
    if not (1 <= hour <= 12 and minute <= 59 and second <= 59):
        return None
    hour24 = hour % 12 + (12 if half == "PM" else 0)  # 12 AM is midnight, 12 PM noon
    return hour24 * 3_600 + minute * 60 + second


class _TimeParser:
    """`11/11/2019 9:05:58 AM` -> unix seconds (naive UTC), None if malformed.

    A split has ~150k distinct timestamps but only a few dates and at most 86,400 clock
    readings, so each date and each clock string is parsed once and cached.
    """

    def __init__(self) -> None:
        self.days: dict[str, int | None] = {}
        self.clocks: dict[str, int | None] = {}

    def __call__(self, text: str) -> int | None:
        date, _, clock = text.partition(" ")
        days = self.days.get(date, -1)
        if days == -1:
            days = self.days[date] = _parse_date(date)
        seconds = self.clocks.get(clock, -1)
        if seconds == -1:
            seconds = self.clocks[clock] = _parse_clock(clock)
        if days is None or seconds is None:
            return None
        return days * 86_400 + seconds


def parse_time(text: str) -> int:
    """One MIND timestamp `11/11/2019 9:05:58 AM` -> unix seconds (naive UTC)."""
    seconds = _TimeParser()(text)
    if seconds is None:
        raise ValueError(f"time {text!r} is not {TIME_FORMAT_HINT}")
    return seconds


def format_time(seconds: int) -> str:
    """Unix seconds -> MIND's `11/11/2019 9:05:58 AM` (no zero padding of month, day, hour)."""
    t = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    half = "AM" if t.hour < 12 else "PM"
    return f"{t.month}/{t.day}/{t.year} {t.hour % 12 or 12}:{t.minute:02d}:{t.second:02d} {half}"


class _NewsKeys:
    """News id -> index on raw UTF-8 bytes, without a Python str per token.

    A dict lookup per token costs a fresh str, its hash and a few cache misses (~0.3 us
    here, seconds per MIND split). Instead each id becomes a fixed-width key, its bytes
    zero-padded to W (a multiple of 8, the longest id rounded up) and viewed as W/8 uint64
    words, stored in an open-addressing hash table (linear probing, load <= 1/4). Tokens
    are cut from the joined column's bytes the same way and probed all at once with numpy.
    Ids cannot contain NUL (it is the padding, and an all-zero key marks an empty slot).
    """

    _MULTIPLIERS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9)

    def __init__(self, index: Mapping[str, int]):
        encoded = [news_id.encode("utf-8") for news_id in index]
        if any(not e or b"\0" in e for e in encoded):
            raise ValueError("news ids must be non-empty and must not contain NUL characters")
        self.width = 8 * max(1, -(-max(map(len, encoded), default=0) // 8))
        self.words = self.width // 8
        keys = np.array(encoded, dtype=f"S{self.width}").view("<u8").reshape(-1, self.words)
        bits = max(4, (4 * len(encoded)).bit_length())
        self.mask = (1 << bits) - 1
        self.shift = np.uint64(64 - bits)
        self.table = np.zeros((self.mask + 1, self.words), dtype=np.uint64)  # (S, W/8)
        self.values = np.zeros(self.mask + 1, dtype=np.int32)  # (S,)
        used = bytearray(self.mask + 1)
        slots = []
        for slot in self._hash(keys).tolist():
            while used[slot]:
                slot = (slot + 1) & self.mask
            used[slot] = 1
            slots.append(slot)
        self.table[slots] = keys
        self.values[slots] = np.fromiter(index.values(), dtype=np.int32, count=len(encoded))

    def _hash(self, keys: np.ndarray) -> np.ndarray:
        """(T, W/8) uint64 keys -> (T,) int64 slots: multiplicative hashing, top bits."""
        mixed = np.zeros(len(keys), dtype=np.uint64)
        for j in range(self.words):
            multiplier = np.uint64(self._MULTIPLIERS[j % len(self._MULTIPLIERS)])
            mixed = (mixed ^ keys[:, j]) * multiplier  # wraps modulo 2**64 by design
        return (mixed >> self.shift).astype(np.int64)

    def lookup(self, raw: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray | None:
        """Indices of the tokens raw[starts[t]:starts[t] + lengths[t]] as (T,) int32, or None
        if any token is not a news id. `raw` (bytes,) uint8; every length is >= 1."""
        if len(starts) == 0:
            return np.empty(0, dtype=np.int32)
        # A NUL would vanish into the padding and let "N1\0" match N1.
        if lengths.max() > self.width or (raw == 0).any():
            return None
        padded = np.concatenate((raw, np.zeros(self.width, dtype=np.uint8)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, self.width)[starts]  # (T, W)
        inside = np.arange(self.width) < lengths[:, None]  # (T, W) bytes of the token itself
        tokens = np.where(inside, windows, np.uint8(0)).view("<u8")  # (T, W/8)
        out = np.empty(len(starts), dtype=np.int32)  # (T,)
        pending = np.arange(len(starts))  # tokens still probing
        slots = self._hash(tokens)
        while len(pending):
            stored = self.table[slots]  # (P, W/8)
            hit = (stored == tokens[pending]).all(axis=1)
            if not (hit | stored.any(axis=1)).all():
                return None  # reached an empty slot: not a news id
            out[pending[hit]] = self.values[slots[hit]]
            pending, slots = pending[~hit], (slots[~hit] + 1) & self.mask
        return out


def _token_bounds(joined: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """UTF-8 bytes of a single-space-separated string and each token's start and end.

    A space byte never occurs inside a multi-byte character, so byte positions are safe.
    Returns raw (bytes,) uint8, starts (T,) int64, ends (T,) int64 (exclusive).
    """
    raw = np.frombuffer(joined.encode("utf-8"), dtype=np.uint8)
    ends = np.append(np.flatnonzero(raw == _SPACE), raw.size)
    starts = np.concatenate(([0], ends[:-1] + 1))
    return raw, starts, ends


def _has_empty_token(joined: str) -> bool:
    """Whether splitting a single-space-joined string on " " yields an empty token."""
    return not joined or "  " in joined or joined[0] == " " or joined[-1] == " "


def _parse_behavior_chunk(
    lines: list[str],
    keys: _NewsKeys,
    labeled: bool,
    seen: dict[int, int],
    time_parser: _TimeParser,
) -> _Chunk | None:
    """Bulk-parse well-formed rows; None if any row breaks a rule (the caller then walks
    the rows one by one). `seen` holds impression ids of earlier chunks and is not changed.
    """
    m = len(lines)
    rows = [line.split("\t") for line in lines]
    if any(len(row) != BEHAVIOR_COLUMNS for row in rows):
        return None
    imp_s, user_s, time_s, hist_s, cand_s = zip(*rows)

    joined_ids = "".join(imp_s)
    if not (all(imp_s) and joined_ids.isascii() and joined_ids.isdigit()):
        return None
    try:
        impression_ids = np.fromiter(map(int, imp_s), dtype=np.int64, count=m)
    except OverflowError:
        return None
    id_set = set(impression_ids.tolist())
    if len(id_set) != m or not seen.keys().isdisjoint(id_set):
        return None
    if not all(user_s):
        return None

    # Many impressions share a timestamp string; parse each distinct one once.
    stamps = {text: time_parser(text) for text in set(time_s)}
    if None in stamps.values():
        return None
    times = np.fromiter(map(stamps.__getitem__, time_s), dtype=np.int64, count=m)

    # With single-space separators (checked below) a row has count(" ") + 1 tokens.
    hist_lengths = np.fromiter(
        (h.count(" ") + 1 if h else 0 for h in hist_s), dtype=np.int64, count=m
    )
    hist_joined = " ".join(filter(None, hist_s))
    if hist_joined and _has_empty_token(hist_joined):
        return None
    hist_items = np.empty(0, dtype=np.int32)
    if hist_joined:
        raw, starts, ends = _token_bounds(hist_joined)
        hist_items = keys.lookup(raw, starts, ends - starts)
        if hist_items is None:
            return None

    cand_lengths = np.fromiter((c.count(" ") + 1 for c in cand_s), dtype=np.int64, count=m)
    cand_joined = " ".join(cand_s)
    if _has_empty_token(cand_joined):
        return None
    raw, starts, ends = _token_bounds(cand_joined)
    if labeled:
        # Every token must be <id>-0 or <id>-1 with a non-empty id: at least 3 bytes.
        if (ends - starts < 3).any():
            return None
        labels = raw[ends - 1] - _ZERO  # (T,) uint8: bytes below "0" wrap to large values
        if not ((raw[ends - 2] == _DASH) & (labels <= 1)).all():
            return None
        cand_items = keys.lookup(raw, starts, ends - starts - 2)
        labels = labels.astype(np.int8)
    else:
        cand_items = keys.lookup(raw, starts, ends - starts)
        labels = np.full(len(starts), -1, dtype=np.int8)
    if cand_items is None:
        return None
    return _Chunk(
        impression_ids, user_s, times, hist_lengths, hist_items, cand_lengths, cand_items, labels
    )


def _candidate_problem(
    token: str, index: Mapping[str, int], labeled: bool
) -> tuple[str, str] | None:
    """The rule one candidate token breaks, as (reason, detail), or None."""
    has_label = len(token) >= 2 and token[-2] == "-" and token[-1] in "01"
    if labeled:
        if token in index and not has_label:
            return MIXED_LABELS, f"candidate {token} has no -0/-1 label but the file is labeled"
        if not has_label or len(token) < 3:
            shown = repr(token) if token else "'' (empty: two spaces, or a leading/trailing space)"
            return BAD_CANDIDATE, f"bad candidate token {shown}: expected NEWSID-0 or NEWSID-1"
        news_id = token[:-2]
    else:
        if not token:
            detail = "empty candidate token (two spaces, or a leading/trailing space)"
            return BAD_CANDIDATE, detail
        if token not in index and has_label and len(token) >= 3:
            detail = f"candidate {token} has a label but the file is unlabeled"
            return MIXED_LABELS, detail
        news_id = token
    if news_id not in index:
        return UNKNOWN_CANDIDATE, f"candidate news id {news_id} is not in news.tsv"
    return None


def _unknown_ids(history: str, candidates: str, index: Mapping[str, int], labeled: bool) -> set[str]:
    """The news ids one row refers to (history tokens, candidates) that `index` lacks."""
    out = {t for t in history.split(" ") if t and t not in index} if history else set()
    for token in candidates.split(" "):
        problem = _candidate_problem(token, index, labeled)
        if problem is not None and problem[0] == UNKNOWN_CANDIDATE:
            out.add(token[:-2] if labeled else token)
    return out


def _clean_behavior_chunk(
    lines: list[str],
    numbers: list[int],
    index: Mapping[str, int],
    labeled: bool,
    seen: dict[int, int],
    time_parser: _TimeParser,
    path: str,
    strict: bool,
    report: ReadReport,
) -> tuple[list[str], list[int]]:
    """Row by row: raise at the first bad row (strict) or return only the good rows, with
    bad history tokens removed (lenient). Applies exactly the rules of the bulk parser.
    """
    kept: list[str] = []
    kept_numbers: list[int] = []
    first_line: dict[int, int] = {}
    for line, number in zip(lines, numbers):
        parts = line.split("\t")
        if len(parts) != BEHAVIOR_COLUMNS:
            found = "an empty line" if line == "" else f"{len(parts)}"
            detail = f"expected {BEHAVIOR_COLUMNS} tab-separated columns, found {found}"
            _reject(strict, report, path, number, BAD_COLUMNS, detail)
            continue
        imp, user, time_text, history, candidates = parts
        if not strict:
            report.missing_ids.update(_unknown_ids(history, candidates, index, labeled))
        if not (imp.isascii() and imp.isdigit() and int(imp) <= _INT64_MAX):
            detail = f"impression id {imp!r} is not a non-negative integer"
            _reject(strict, report, path, number, BAD_IMPRESSION_ID, detail)
            continue
        earlier = seen.get(int(imp), first_line.get(int(imp)))
        if earlier is not None:
            detail = f"impression id {imp} already appears on line {earlier}"
            _reject(strict, report, path, number, DUPLICATE_IMPRESSION_ID, detail)
            continue
        if not user:
            _reject(strict, report, path, number, EMPTY_USER_ID, "the user id is empty")
            continue
        if time_parser(time_text) is None:
            detail = f"time {time_text!r} is not {TIME_FORMAT_HINT}"
            _reject(strict, report, path, number, BAD_TIME, detail)
            continue
        problems = [_candidate_problem(t, index, labeled) for t in candidates.split(" ")]
        bad = [p for p in problems if p is not None]
        if bad:
            _reject(strict, report, path, number, *bad[0])
            continue
        history_tokens = history.split(" ") if history else []
        known = [t for t in history_tokens if t in index]
        if len(known) != len(history_tokens):
            empty = history_tokens.count("")
            unknown = [t for t in history_tokens if t and t not in index]
            if strict:
                first = next(t for t in history_tokens if t not in index)
                reason, detail = (
                    (UNKNOWN_HISTORY, f"history news id {first} is not in news.tsv")
                    if first
                    else (EMPTY_HISTORY_TOKEN, "empty history token (two spaces, or a "
                          "leading/trailing space)")
                )
                raise DataFormatError(path, number, f"{detail}; {_ADVICE[reason]}")
            if empty:
                report.drop(path, number, EMPTY_HISTORY_TOKEN, "empty history token", empty)
            if unknown:
                detail = f"history news id {unknown[0]} is not in news.tsv"
                report.drop(path, number, UNKNOWN_HISTORY, detail, len(unknown))
            line = "\t".join((imp, user, time_text, " ".join(known), candidates))
        first_line[int(imp)] = number
        kept.append(line)
        kept_numbers.append(number)
    return kept, kept_numbers


def _detect_labeled(lines: list[str]) -> bool:
    """Labeled iff the first candidate of the first row with enough columns ends in -0/-1."""
    for line in lines:
        parts = line.split("\t")
        if len(parts) == BEHAVIOR_COLUMNS:
            first = parts[4].split(" ", 1)[0]
            return len(first) >= 3 and first[-2] == "-" and first[-1] in "01"
    return True


def read_behaviors(
    path: str | Path,
    news_index: Mapping[str, int],
    *,
    strict: bool = True,
    report: ReadReport | None = None,
) -> Behaviors:
    """Read behaviors.tsv; news ids become indices through `news_index` (`News.index`).

    Strict: the first bad row raises DataFormatError with its line. Lenient: bad rows are
    skipped and unknown or empty history tokens dropped, all counted in `report` (pass one
    to see them).
    """
    path = Path(path)
    report = report if report is not None else ReadReport()
    lines, numbers = _read_lines(path, strict, report, "impression log behaviors.tsv")
    labeled = _detect_labeled(lines)
    seen: dict[int, int] = {}  # impression id -> line, across chunks
    keys = _NewsKeys(news_index)
    time_parser = _TimeParser()
    chunks: list[_Chunk] = []
    for start in range(0, len(lines), _CHUNK_ROWS):
        chunk_lines = lines[start : start + _CHUNK_ROWS]
        chunk_numbers = numbers[start : start + _CHUNK_ROWS]
        chunk = _parse_behavior_chunk(chunk_lines, keys, labeled, seen, time_parser)
        if chunk is None:
            chunk_lines, chunk_numbers = _clean_behavior_chunk(
                chunk_lines,
                chunk_numbers,
                news_index,
                labeled,
                seen,
                time_parser,
                str(path),
                strict,
                report,
            )
            if strict:
                raise AssertionError(f"{path}: bulk check failed but every row is valid")
            if not chunk_lines:
                continue
            chunk = _parse_behavior_chunk(chunk_lines, keys, labeled, seen, time_parser)
            if chunk is None:
                raise AssertionError(f"{path}: cleaned rows still fail the bulk check")
        seen.update(zip(chunk.impression_ids.tolist(), chunk_numbers))
        chunks.append(chunk)
    return _assemble(str(path), chunks, labeled)


def _offsets(lengths: list[np.ndarray]) -> np.ndarray:
    """Per-row lengths of all chunks -> (M+1,) int64 offsets starting at 0."""
    out = np.zeros(sum(len(x) for x in lengths) + 1, dtype=np.int64)
    if lengths:
        np.cumsum(np.concatenate(lengths), out=out[1:])
    return out


def _assemble(path: str, chunks: list[_Chunk], labeled: bool) -> Behaviors:
    def cat(name: str, dtype: type) -> np.ndarray:
        parts = [getattr(c, name) for c in chunks]
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.empty(0, dtype)

    user_ids = np.empty(sum(len(c.user_ids) for c in chunks), dtype=object)  # (M,)
    user_ids[:] = [u for c in chunks for u in c.user_ids]
    return Behaviors(
        path=path,
        impression_ids=cat("impression_ids", np.int64),
        user_ids=user_ids,
        times=cat("times", np.int64),
        hist_offsets=_offsets([c.hist_lengths for c in chunks]),
        hist_items=cat("hist_items", np.int32),
        cand_offsets=_offsets([c.cand_lengths for c in chunks]),
        cand_items=cat("cand_items", np.int32),
        labels=cat("labels", np.int8),
        labeled=labeled,
    )


# ---------------------------------------------------------------- splits and validation


@dataclass(frozen=True, eq=False)
class Split:
    """One MIND split folder: its news table, its impressions, and what lenient reading
    skipped."""

    news: News
    behaviors: Behaviors
    report: ReadReport


def load_split(split_dir: str | Path, *, strict: bool = True) -> Split:
    """Read `split_dir/news.tsv` and `split_dir/behaviors.tsv`."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise PipelineError(
            f"{split_dir}: no such folder; expected a MIND split folder with news.tsv and "
            "behaviors.tsv"
        )
    report = ReadReport()
    news = read_news(split_dir / "news.tsv", strict=strict, report=report)
    behaviors = read_behaviors(
        split_dir / "behaviors.tsv", news.index, strict=strict, report=report
    )
    return Split(news, behaviors, report)


def split_stats(split: Split) -> dict[str, int | bool | None]:
    """The counts `validate` prints; click counts are None for an unlabeled split."""
    b = split.behaviors
    clicked = np.concatenate(([0], np.cumsum(b.labels == 1)))  # (T+1,) clicks before row t
    clicks_per = clicked[b.cand_offsets[1:]] - clicked[b.cand_offsets[:-1]]  # (M,)
    return {
        "news": len(split.news),
        "users": len(b.users()),
        "impressions": b.n_impressions,
        "candidates": b.n_candidates,
        "labeled": b.labeled,
        "clicks": int((b.labels == 1).sum()) if b.labeled else None,
        "empty histories": int((np.diff(b.hist_offsets) == 0).sum()),
        "impressions without clicks": int((clicks_per == 0).sum()) if b.labeled else None,
        "ids missing from news.tsv": len(split.report.missing_ids),
        "skipped rows": split.report.total_skipped,
        "dropped history ids": split.report.total_dropped,
    }


def _split_dirs(path: Path) -> list[Path]:
    """PATH itself when it is a split folder, else its train/ dev/ test/ subfolders."""
    if not path.exists():
        raise PipelineError(f"{path}: no such file or folder")
    if not path.is_dir():
        raise PipelineError(
            f"{path}: not a folder; pass a split folder (news.tsv + behaviors.tsv) or a "
            "dataset root holding train/ dev/ test/"
        )
    if (path / "news.tsv").exists() or (path / "behaviors.tsv").exists():
        return [path]
    found = [path / name for name in SPLIT_NAMES if (path / name).is_dir()]
    if not found:
        raise PipelineError(
            f"{path}: neither a split folder (no news.tsv or behaviors.tsv) nor a dataset "
            "root (no train/, dev/ or test/ subfolder); pass the folder that holds them"
        )
    return found


def _format_table(names: list[str], stats: list[dict]) -> list[str]:
    """One row per count, one right-aligned column per split."""
    def cell(value: int | bool | None) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        return f"{value:,}"

    keys = list(stats[0])
    label_width = max(map(len, keys))
    widths = [max(len(n), *(len(cell(s[k])) for k in keys)) for n, s in zip(names, stats)]
    header = " " * label_width + "".join(f"  {n:>{w}}" for n, w in zip(names, widths))
    body = [
        f"{k:<{label_width}}" + "".join(f"  {cell(s[k]):>{w}}" for s, w in zip(stats, widths))
        for k in keys
    ]
    return [header, *body]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m storage.mind", description="Check MIND split folders."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser(
        "validate", help="read a split folder or dataset root and print its counts"
    )
    validate.add_argument("path", type=Path, help="split folder, or root with train/ dev/ test/")
    validate.add_argument(
        "--lenient",
        action="store_true",
        help="skip bad rows and report them instead of failing (exit 0 unless unreadable)",
    )
    validate.add_argument("--json", action="store_true", help="print the counts as JSON")
    args = parser.parse_args(argv)

    dirs = _split_dirs(args.path)
    splits = [load_split(d, strict=not args.lenient) for d in dirs]
    names = [d.name or str(d) for d in dirs]
    stats = [split_stats(s) for s in splits]
    if args.json:
        payload = {
            name: {**st, "path": str(d), "report": s.report.to_dict()}
            for name, st, d, s in zip(names, stats, dirs, splits)
        }
        print(json.dumps(payload, indent=2))
        return 0
    print("\n".join(_format_table(names, stats)))
    for name, st, split in zip(names, stats, splits):
        if st["impressions without clicks"]:
            print(
                f"\n{name}: {st['impressions without clicks']:,} labeled impression(s) have no "
                "click; they are kept, give no click-based training example, and our metrics "
                "skip and count them (AUC and MRR need a click); the official scorer does not "
                "skip them (it gives NaN)"
            )
        if split.report:
            print(f"\n{name}:")
            print("\n".join(f"  {line}" for line in split.report.lines()))
    skipped = sum(split.report.total_skipped for split in splits)
    mode = f"lenient, {skipped:,} row(s) skipped" if args.lenient else "strict"
    print(f"\nok: {len(splits)} split(s) read ({mode})")
    return 0


if __name__ == "__main__":
    run_cli(main)
