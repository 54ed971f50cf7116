"""Leaderboard files: truth, prediction, and per-candidate values, one impression per line.

Letters: M impressions (lines), T candidate rows (all lines' lists, concatenated).

Every file has one line per impression, `<impression_id> [v1,v2,...]`: the id, a space,
and a JSON list with one entry per candidate in the original candidate order.
- truth (`truth.txt`): the labels, 0/1. A line `<id> []` is a masked impression: the
  scorer skips it, and reads only the id of its prediction line (see `read_prediction`).
- prediction (`prediction.txt`): each candidate's rank, 1 = best, a permutation of 1..n,
  in the truth file's line order.
- values (e.g. the synthetic world's `click_probs.txt`): floats, fixed decimals.
Files are written like the official ones (no space after commas, `\\n` line ends), and
atomically (storage.atomic): a full disk leaves the previous file, or none, under the name;
readers also accept spaces inside the list, CRLF line ends and trailing blank lines.

Reading is a Python pass over lines that only splits off the id and the bracketed text,
then one bulk numeric parse of all lists joined together; only when that fails are the
lines parsed one by one to find the first bad one. Every problem is a
`storage.errors.DataFormatError(path, line, message)` whose message says what to do; for
several problems the one on the earliest line is reported.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage.atomic import write_text
from storage.errors import DataFormatError, PipelineError

PathLike = str | os.PathLike[str]

PREDICTION_FORMAT = "'<impression_id> [r1,r2,...]' (an id, a space, a JSON list of ranks)"
TRUTH_FORMAT = "'<impression_id> [l1,l2,...]' (an id, a space, a JSON list of 0/1 labels)"
VALUES_FORMAT = "'<impression_id> [v1,v2,...]' (an id, a space, a JSON list of numbers)"


@dataclass(frozen=True)
class Truth:
    """The labels of a truth file."""

    ids: np.ndarray  # (M,) object array of str, file order
    offsets: np.ndarray  # (M+1,) int64: line i owns rows offsets[i]:offsets[i+1]
    labels: np.ndarray  # (T,) int8, 0/1


@dataclass(frozen=True)
class Values:
    """The per-candidate floats of a values file."""

    ids: np.ndarray  # (M,) object array of str
    offsets: np.ndarray  # (M+1,) int64
    values: np.ndarray  # (T,) float64


def write_truth(
    path: PathLike, impression_ids: Sequence[object], offsets: Sequence[int] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
) -> None:
    """Write `<id> [l1,l2,...]` lines; labels (T,) must be 0/1."""
    ids, offsets = _checked_layout(impression_ids, offsets)
    labels = np.asarray(labels)
    _check_length(labels, offsets, "labels")
    if len(labels) and not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    _write_lines(path, ids, offsets, list(map(str, labels.astype(np.int64).tolist())))


def read_truth(path: PathLike) -> Truth:
    """Read a truth file; labels must be 0/1 and impression ids unique."""
    parsed = _parse(path, np.int64, TRUTH_FORMAT)
    bad = np.flatnonzero((parsed.flat != 0) & (parsed.flat != 1))
    if len(bad):
        line = _line_of(parsed.offsets, int(bad[0]))
        parsed.fail_before(
            line, f"label {parsed.flat[bad[0]]} is not 0 or 1; a truth file holds 0/1 labels"
        )
    first_seen: dict[str, int] = {}
    for line, imp in enumerate(parsed.ids, start=1):
        if imp in first_seen:
            parsed.fail_before(
                line,
                f"impression id {imp} already appeared at line {first_seen[imp]}; "
                "each impression must appear once",
            )
            break
        first_seen[imp] = line
    parsed.raise_pending()
    return Truth(
        ids=np.array(parsed.ids, dtype=object),
        offsets=parsed.offsets,
        labels=parsed.flat.astype(np.int8),
    )


def write_prediction(
    path: PathLike, impression_ids: Sequence[object], offsets: Sequence[int] | np.ndarray,
    ranks: Sequence[int] | np.ndarray,
) -> None:
    """Write `<id> [r1,r2,...]` lines in the given order, using the real impression ids.

    ranks (T,): within each impression a permutation of 1..n, 1 = best
    (see `rankers.metrics.ranks_from_scores`).
    """
    ids, offsets = _checked_layout(impression_ids, offsets)
    ranks = np.asarray(ranks)
    _check_length(ranks, offsets, "ranks")
    if not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must be integers, got dtype {ranks.dtype}")
    bad = _first_non_permutation(offsets, ranks.astype(np.int64))
    if bad is not None:
        raise ValueError(
            f"ranks of impression {ids[bad]} (position {bad}) are not a permutation of "
            f"1..{offsets[bad + 1] - offsets[bad]}"
        )
    _write_lines(path, ids, offsets, list(map(str, ranks.tolist())))


def read_prediction(path: PathLike, truth: Truth) -> np.ndarray:
    """(T,) int64 ranks of a prediction file, checked line by line against `truth`.

    The file must have exactly one line per truth impression, in the truth's order, with
    the same id, one rank per candidate, and the ranks a permutation of 1..n.

    A masked truth impression (`<id> []`, no candidates) is skipped as the official scorer
    skips it: whatever its prediction line holds after the id is not read (a real submission
    ranks the candidates the truth hides). Its id is still checked, like every line's.
    """
    lines = _read_lines(Path(path))
    masked = np.flatnonzero(np.diff(truth.offsets) == 0)  # (masked,) line indices
    for i in masked[masked < len(lines)].tolist():
        first = lines[i].split(None, 1)
        if first:  # an empty line stays one, and is reported as such
            lines[i] = f"{first[0]} []"
    parsed = _parse(path, np.int64, PREDICTION_FORMAT, lines)
    m = len(truth.ids)
    n_lines = len(parsed.ids)
    k = min(n_lines, m)
    sizes = np.diff(truth.offsets)  # (M,)
    got = np.diff(parsed.offsets)  # (n_lines,)
    # str() so a Truth built in code with integer ids compares like one read from a file.
    expected_ids = np.array([str(i) for i in truth.ids[:k]], dtype=object)
    wrong_id = np.flatnonzero(np.asarray(parsed.ids[:k], dtype=object) != expected_ids)
    wrong_count = np.flatnonzero(got[:k] != sizes[:k])
    first_bad = min([k, *wrong_id[:1].tolist(), *wrong_count[:1].tolist()])
    # Permutations are only checked on the lines before the first misaligned one, where
    # the rows of the file and of the truth correspond.
    prefix = parsed.offsets[: first_bad + 1]
    bad_perm = _first_non_permutation(prefix, parsed.flat[: prefix[-1]])
    if bad_perm is not None:
        n = sizes[bad_perm]
        parsed.fail_before(
            bad_perm + 1,
            f"the ranks of impression {truth.ids[bad_perm]} are not a permutation of 1..{n} "
            f"({_permutation_problem(parsed.flat[prefix[bad_perm]:prefix[bad_perm + 1]])}); "
            "give each candidate a distinct rank from 1 (best) to the number of candidates",
        )
    elif first_bad < k:
        line = first_bad + 1
        if len(wrong_id) and wrong_id[0] == first_bad:
            parsed.fail_before(
                line,
                f"impression id {parsed.ids[first_bad]} where the truth file has "
                f"{truth.ids[first_bad]}; write one line per truth impression, in the "
                "truth file's order",
            )
        else:
            parsed.fail_before(
                line,
                f"impression {truth.ids[first_bad]} has {got[first_bad]} ranks but "
                f"{sizes[first_bad]} candidates in the truth file; give one rank per "
                "candidate, in the original candidate order",
            )
    elif n_lines < m:
        parsed.fail_before(
            n_lines + 1,
            f"missing lines: the prediction ends after {n_lines} lines but the truth file "
            f"has {m} impressions (the next one is {truth.ids[n_lines]}); write one line per "
            "truth impression",
        )
    elif n_lines > m:
        parsed.fail_before(
            m + 1,
            f"extra line: the truth file has only {m} impressions; remove the lines after "
            f"line {m}",
        )
    parsed.raise_pending()
    return parsed.flat


def write_values(
    path: PathLike, impression_ids: Sequence[object], offsets: Sequence[int] | np.ndarray,
    values: Sequence[float] | np.ndarray, decimals: int = 6,
) -> None:
    """Write `<id> [v1,v2,...]` lines with `decimals` fixed decimals (deterministic text)."""
    ids, offsets = _checked_layout(impression_ids, offsets)
    values = np.asarray(values, dtype=np.float64)
    _check_length(values, offsets, "values")
    if not np.isfinite(values).all():
        raise ValueError("values must be finite: JSON has no NaN or infinity")
    if not 0 <= decimals <= 17:
        raise ValueError(f"decimals must be in 0..17, got {decimals}")
    # Adding 0.0 turns -0.0 into 0.0, so equal values always print the same.
    fmt = f"{{:.{decimals}f}}".format
    _write_lines(path, ids, offsets, list(map(fmt, (values + 0.0).tolist())))


def read_values(path: PathLike) -> Values:
    """Read a values file written by `write_values` (any JSON numbers are accepted)."""
    parsed = _parse(path, np.float64, VALUES_FORMAT)
    bad = np.flatnonzero(~np.isfinite(parsed.flat))
    if len(bad):
        parsed.fail_before(
            _line_of(parsed.offsets, int(bad[0])),
            f"value {parsed.flat[bad[0]]} is not a finite number; write plain decimals",
        )
    parsed.raise_pending()
    return Values(
        ids=np.array(parsed.ids, dtype=object), offsets=parsed.offsets, values=parsed.flat
    )


class _Parsed:
    """The well-formed lines before the first unparsable one, and that line's error.

    Content checks run on these lines and report through `fail_before`, which keeps the
    error on the earliest line; `raise_pending` raises it.
    """

    def __init__(self, path: Path, ids: list[str], counts: list[int], flat: np.ndarray,
                 error: DataFormatError | None):
        self.path = path
        self.ids = ids  # (M,) for the parsed lines
        self.offsets = np.zeros(len(counts) + 1, dtype=np.int64)  # (M+1,)
        np.cumsum(counts, out=self.offsets[1:])
        self.flat = flat  # (T,)
        self.error = error

    def fail_before(self, line: int, message: str) -> None:
        if self.error is None or line < (self.error.line or 0):
            self.error = DataFormatError(self.path, line, message)

    def raise_pending(self) -> None:
        if self.error is not None:
            raise self.error


def _parse(path: PathLike, dtype: type, expected: str, lines: list[str] | None = None) -> _Parsed:
    """Split lines into ids and list text, then parse all lists at once. `lines`: the file's
    lines when the caller has read (and adjusted) them already."""
    path = Path(path)
    if lines is None:
        lines = _read_lines(path)
    kind = "integers" if dtype is np.int64 else "numbers"
    ids: list[str] = []
    inner: list[str] = []  # the text between the brackets, per line
    counts: list[int] = []
    error = None
    for number, line in enumerate(lines, start=1):
        parts = line.split(None, 1)
        payload = parts[1].strip() if len(parts) == 2 else ""
        if len(payload) < 2 or payload[0] != "[" or payload[-1] != "]":
            shown = line if len(line) <= 60 else line[:57] + "..."
            what = "empty line" if not line.strip() else f"cannot parse {shown!r}"
            error = DataFormatError(path, number, f"{what}: expected {expected}")
            break
        text = payload[1:-1].strip()
        ids.append(parts[0])
        inner.append(text)
        counts.append(text.count(",") + 1 if text else 0)

    flat = _parse_numbers(",".join(t for t in inner if t), dtype, sum(counts))
    if flat is None:
        # Find the first line whose list does not parse, and keep the lines before it.
        for i, text in enumerate(inner):
            if text and _parse_numbers(text, dtype, counts[i]) is None:
                shown = text if len(text) <= 40 else text[:37] + "..."
                error = DataFormatError(
                    path, i + 1,
                    f"cannot parse the list [{shown}]: expected {kind} separated by commas, "
                    f"as in {expected}",
                )
                del ids[i:], inner[i:], counts[i:]
                break
        flat = _parse_numbers(",".join(t for t in inner if t), dtype, sum(counts))
        assert flat is not None, "every line parsed alone, so their join parses"
    return _Parsed(path, ids, counts, flat, error)


def _parse_numbers(text: str, dtype: type, count: int) -> np.ndarray | None:
    """`count` comma-separated numbers, or None if the text is not exactly that."""
    if count == 0:
        return np.zeros(0, dtype=dtype) if not text else None
    try:
        with warnings.catch_warnings():
            # numpy < 2.3 warns and returns what it read so far instead of raising.
            warnings.simplefilter("ignore", DeprecationWarning)
            values = np.fromstring(text, dtype=dtype, sep=",")
    except ValueError:
        return None
    # A trailing comma ("1,2,") parses short; the count from commas catches it.
    return values if len(values) == count else None


def _read_lines(path: Path) -> list[str]:
    """Lines without their ends; trailing blank lines dropped; an empty file is an error."""
    if not path.exists():
        raise PipelineError(f"{path}: no such file; check the path")
    if not path.is_file():
        raise PipelineError(f"{path}: not a file; give the path of a text file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataFormatError(
            path, line, f"not UTF-8 text (byte {data[err.start]:#04x}); is this the right file?"
        ) from None
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataFormatError(
            path, 1, "the file is empty; expected one line per impression, "
            "'<impression_id> [v1,v2,...]'"
        )
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _line_of(offsets: np.ndarray, row: int) -> int:
    """1-based line of a row."""
    return int(np.searchsorted(offsets, row, side="right"))


def _first_non_permutation(offsets: np.ndarray, ranks: np.ndarray) -> int | None:
    """Index of the first impression whose ranks are not a permutation of 1..n, or None.

    A rank in 1..n at a distinct slot for every row: put each row at slot
    offsets[i] + rank - 1 and count; a permutation fills each slot exactly once.
    """
    t = len(ranks)
    if t == 0:
        return None
    seg = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))  # (T,)
    size = (offsets[1:] - offsets[:-1])[seg]  # (T,)
    in_range = (ranks >= 1) & (ranks <= size)
    slot = offsets[seg] + np.where(in_range, ranks, 1) - 1  # (T,)
    filled = np.bincount(slot, minlength=t)  # (T,)
    bad_rows = np.flatnonzero(~in_range | (filled[slot] != 1))
    if len(bad_rows) == 0:
        return None
    return int(seg[bad_rows[0]])


def _permutation_problem(ranks: np.ndarray) -> str:
    """Say what is wrong with one impression's ranks (n is small)."""
    n = len(ranks)
    out = [int(r) for r in ranks if not 1 <= r <= n]
    if out:
        return f"rank {out[0]} is outside 1..{n}"
    values, counts = np.unique(ranks, return_counts=True)
    return f"rank {int(values[counts > 1][0])} appears {int(counts[counts > 1][0])} times"


def _checked_layout(
    impression_ids: Sequence[object], offsets: Sequence[int] | np.ndarray
) -> tuple[list[str], np.ndarray]:
    ids = [str(i) for i in impression_ids]
    offsets = np.asarray(offsets)
    if offsets.ndim != 1 or len(offsets) != len(ids) + 1:
        raise ValueError(
            f"offsets must have one more entry than impression_ids ({len(ids) + 1}), "
            f"got shape {offsets.shape}"
        )
    if not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"offsets must be integers, got dtype {offsets.dtype}")
    offsets = offsets.astype(np.int64)
    if offsets[0] != 0 or (np.diff(offsets) < 0).any():
        raise ValueError("offsets must start at 0 and be non-decreasing")
    for imp in ids:
        if not imp or imp != imp.strip() or len(imp.split()) != 1:
            raise ValueError(f"impression id {imp!r} must be non-empty and without whitespace")
    return ids, offsets


def _check_length(values: np.ndarray, offsets: np.ndarray, name: str) -> None:
    if values.ndim != 1 or len(values) != offsets[-1]:
        raise ValueError(
            f"{name} must be 1-D with offsets[-1] = {offsets[-1]} entries, got shape "
            f"{values.shape}"
        )


def _write_lines(path: PathLike, ids: list[str], offsets: np.ndarray, tokens: list[str]) -> None:
    """Write `<id> [t1,t2,...]` lines atomically (storage.atomic): a reader never sees half a
    file, and a full disk leaves the previous file, or none, under the name."""
    bounds = offsets.tolist()
    text = "".join(
        f"{imp} [{','.join(tokens[bounds[i]:bounds[i + 1]])}]\n" for i, imp in enumerate(ids)
    )
    write_text(path, text)
