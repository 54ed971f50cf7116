"""Sharded feature stores: contiguous row ranges of one store written apart, then merged.

A sharded extraction splits the N rows of a store `<features>/<stem>.h5` into K contiguous
ranges [start, stop). Each range goes into its own ordinary, resumable store (the same
`FeatureWriter`, so a killed shard resumes its partial and a complete shard is reused):

    <features>/shards/<stem>.shard-00-of-02.h5    rows [0, s1)
    <features>/shards/<stem>.shard-01-of-02.h5    rows [s1, N)

A shard store holds the same `StoreMeta` as the whole store (same extractor config,
fingerprint of the whole catalogue, dim, dtype, token_len, extras), only its own rows' ids and
vectors (tokens, extras), and five extra root attributes: `shard_index`, `shard_count`, `shard_start`,
`shard_stop` and `shard_of_rows` (N). Boundaries are whole multiples of the extraction's
chunk, so each shard forms exactly the batches a single process would have formed and its
vectors are bit-identical to that run's rows.

`merge_shards` checks every shard (present, complete, same meta, ids equal to its row range
of the catalogue, ranges covering 0..N-1 with no gap or overlap) and then copies the rows
into the usual preallocated layout at the usual path, through `FeatureWriter`: the merged
store is an ordinary store, dataset for dataset byte-identical to a single-process one (its
checksums included: blocks are fixed by row number), and a merge killed half-way resumes
like any extraction. The rows are read through `FeatureStore.read_rows`, which verifies each
shard's checksums: a damaged shard is refused, never copied under fresh checksums.
Letters: N rows, K shards, D width.

Not chosen: an HDF5 virtual dataset over the shard files. It saves the copy, but the store
would no longer be contiguous (`FeatureStore` reads contiguous blocks and refuses other
layouts), it would break whenever a shard file moves or goes, and a missing shard silently
reads as the fill value (docs/ENVIRONMENT.md). The copy costs one sequential read and write
of the store; after it the shard files are redundant and removed by default.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import h5py
import numpy as np

from storage.errors import PipelineError
from storage.features import (
    FeatureStore,
    FeatureWriter,
    StoreIOError,
    StoreMeta,
    partial_path,
    progress_path,
    verify,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

SHARD_DIR = "shards"
SHARD_ATTRS = ("shard_index", "shard_count", "shard_start", "shard_stop", "shard_of_rows")


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of a store, shard `index` of `count`, written to its own store `path`."""

    index: int
    count: int
    start: int
    stop: int
    path: Path

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return _shard_tag(self.index, self.count)

    def describe(self) -> str:
        return f"{self.name} (rows {self.start}..{self.stop - 1} of the store)"

    def attrs(self, total_rows: int) -> dict[str, np.int64]:
        """The extra root attributes that record this shard's place in its store."""
        values = (self.index, self.count, self.start, self.stop, total_rows)
        return {key: np.int64(v) for key, v in zip(SHARD_ATTRS, values)}


def _shard_tag(index: int, count: int) -> str:
    width = max(2, len(str(count)))
    return f"shard-{index:0{width}d}-of-{count:0{width}d}"


def shard_path(store: str | os.PathLike[str], index: int, count: int) -> Path:
    """`<dir>/shards/<stem>.shard-KK-of-NN.h5` for the store `<dir>/<stem>.h5`."""
    store = Path(store)
    return store.parent / SHARD_DIR / f"{store.stem}.{_shard_tag(index, count)}.h5"


def shard_bounds(rows: int, shards: int, chunk_rows: int) -> list[tuple[int, int]]:
    """Split rows 0..rows-1 into at most `shards` contiguous ranges of whole chunks, as even
    as the chunks allow. Fewer ranges come back when there are fewer chunks than shards."""
    if shards < 1 or chunk_rows < 1:
        raise ValueError(f"shards and chunk_rows must be >= 1, got {shards} and {chunk_rows}")
    chunks = max(1, -(-rows // chunk_rows))
    count = min(shards, chunks)
    edges = [min(rows, (k * chunks // count) * chunk_rows) for k in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def plan_shards(store: str | os.PathLike[str], rows: int, shards: int, chunk_rows: int) -> list[Shard]:
    """The shards of `store` (N = rows) for `shards` workers, on chunk boundaries."""
    bounds = shard_bounds(rows, shards, chunk_rows)
    if len(bounds) < shards:
        log.warning("%d rows make only %d chunk(s) of %d rows; using %d shard(s) instead of %d",
                    rows, len(bounds), chunk_rows, len(bounds), shards)
    return [Shard(k, len(bounds), a, b, shard_path(store, k, len(bounds))) for k, (a, b) in enumerate(bounds)]


def recorded_bounds(path: Path) -> dict[str, int] | None:
    """The shard attributes a store file carries, or None when it has none (not a shard)."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            if not all(key in f.attrs for key in SHARD_ATTRS):
                return None
            return {key: int(f.attrs[key]) for key in SHARD_ATTRS}
    except OSError as err:
        raise StoreIOError(f"{path}: cannot read its shard attributes ({err}); check the disk and re-run") from None


def shard_problems(shard: Shard, store: FeatureStore, meta: StoreMeta, ids: np.ndarray) -> list[str]:
    """What keeps an opened, complete shard store from being rows [start, stop) of `ids`
    made with `meta`; empty when it is exactly that."""
    problems = store.meta.differences(meta)
    want = ids[shard.start : shard.stop]
    if len(store.ids) != len(want):
        problems.append(f"rows: file has {len(store.ids)}, the range {shard.start}..{shard.stop - 1} has {len(want)}")
    elif not np.array_equal(store.ids, want):
        first = int(np.flatnonzero(store.ids != want)[0])
        problems.append(f"news ids differ from row {shard.start + first} on "
                        f"(file {store.ids[first]!r}, catalogue {want[first]!r})")
    recorded = recorded_bounds(store.path)
    expected = {key: int(v) for key, v in shard.attrs(len(ids)).items()}
    if recorded is None:
        problems.append("it carries no shard attributes (not written as a shard)")
    elif recorded != expected:
        diff = ", ".join(f"{k}: file has {recorded[k]}, expected {expected[k]}" for k in SHARD_ATTRS
                         if recorded[k] != expected[k])
        problems.append(diff)
    return problems


def check_shards(shards: Sequence[Shard], meta: StoreMeta, ids: Sequence[str] | np.ndarray) -> None:
    """Refuse, naming the shard file and the fix, unless every shard is present, complete,
    made with `meta` and holds exactly its rows, and the shards cover 0..N-1 once."""
    ids = np.asarray(ids, dtype=object)
    n = len(ids)
    _check_coverage(shards, n)
    redo = "re-run the sharded extraction (same shard count and batch size) to compute it"
    for shard in shards:
        where = f"{shard.describe()}, {shard.path}"
        if not shard.path.exists():
            partial = partial_path(shard.path)
            if partial.exists():
                verdict = verify(partial)
                raise PipelineError(f"{where}: not complete ({verdict.committed or 0} of {shard.rows} rows "
                                    f"committed in {partial}); {redo.replace('compute', 'resume')}")
            raise PipelineError(f"{where}: missing; {redo}")
        try:
            with FeatureStore.open(shard.path) as store:
                problems = shard_problems(shard, store, meta, ids)
        except StoreIOError:
            raise
        except PipelineError as err:
            raise PipelineError(f"{shard.describe()}: {err}") from None
        if problems:
            raise PipelineError(f"{where}: does not belong to this store: {'; '.join(problems)}; "
                                f"delete it and {redo}")


def _check_coverage(shards: Sequence[Shard], rows: int) -> None:
    if not shards:
        raise PipelineError("no shards to merge; run the sharded extraction first")
    count = shards[0].count
    indexes = sorted(s.index for s in shards)
    if indexes != list(range(count)) or any(s.count != count for s in shards):
        raise PipelineError(f"shards {', '.join(s.name for s in shards)} are not the whole set of {count}; "
                            f"merge needs every shard once")
    at = 0
    for shard in sorted(shards, key=lambda s: s.index):
        if shard.start != at or shard.stop < shard.start:
            what = "gap" if shard.start > at else "overlap"
            raise PipelineError(f"{shard.describe()}, {shard.path}: starts at row {shard.start} but the "
                                f"previous shard ends at row {at} (a {what}); plan the shards again")
        at = shard.stop
    if at != rows:
        raise PipelineError(f"the shards cover rows 0..{at - 1} but the store has {rows} rows; plan the shards again")


def merge_shards(path: str | os.PathLike[str], shards: Sequence[Shard], meta: StoreMeta,
                 ids: Sequence[str] | np.ndarray, *, fsync: bool = True, remove: bool = True,
                 block_rows: int = 2048) -> Path:
    """Check the shards, copy their rows into the store at `path` and finalize it.

    A merge killed half-way resumes from its committed rows. `remove` deletes the shard files
    (and an empty shards folder) once the merged store is final.
    """
    path = Path(path)
    ids = np.asarray(ids, dtype=object)
    check_shards(shards, meta, ids)
    writer = _merge_writer(path, meta, ids, fsync)
    try:
        for shard in sorted(shards, key=lambda s: s.start):
            if shard.stop <= writer.next_row:
                continue
            _copy_rows(shard, writer, meta, block_rows)
        writer.finalize()
    except BaseException:
        writer.close()
        raise
    if remove:
        remove_shards(shards)
    return path


def _merge_writer(path: Path, meta: StoreMeta, ids: np.ndarray, fsync: bool) -> FeatureWriter:
    if path.exists():  # complete but stale: the caller found it does not match
        return FeatureWriter(path, meta, ids, restart=True, fsync=fsync)
    try:
        return FeatureWriter(path, meta, ids, fsync=fsync)
    except PipelineError as err:
        if isinstance(err, StoreIOError):
            raise
        log.warning("%s; discarding the interrupted merge and starting over", err)
        return FeatureWriter(path, meta, ids, restart=True, fsync=fsync)


def _copy_rows(shard: Shard, writer: FeatureWriter, meta: StoreMeta, block_rows: int) -> None:
    """Rows of `shard` from the writer's next row on, in blocks of at most block_rows, each
    checked against the shard's checksums as it is read."""
    store = _shard_read(shard, lambda: FeatureStore.open(shard.path))
    with store:
        for start in range(max(writer.next_row, shard.start), shard.stop, block_rows):
            a, b = start - shard.start, min(start + block_rows, shard.stop) - shard.start
            # (b-a, D), tokens and extras when the store keeps them
            rows = _shard_read(shard, lambda: store.read_rows(a, b, tokens=meta.has_tokens, extras=True))
            writer.write(rows.vectors, rows.present, tokens=rows.tokens, mask=rows.mask, extras=rows.extras)


def _shard_read(shard: Shard, read: Callable[[], T]) -> T:
    """A read of a shard; its errors name the shard (a disk error stays a retryable StoreIOError)."""
    try:
        return read()
    except StoreIOError as err:
        raise StoreIOError(f"{shard.describe()}: {err}; re-run to resume the merge") from None
    except PipelineError as err:
        raise PipelineError(f"{shard.describe()}: {err}") from None


def remove_shards(shards: Sequence[Shard]) -> None:
    """Delete the shard files, their partials and the shards folder when it ends up empty."""
    for shard in shards:
        for p in (shard.path, partial_path(shard.path), progress_path(shard.path)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
    for folder in {s.path.parent for s in shards}:
        try:
            folder.rmdir()
        except OSError:
            pass  # other stores' shards still live there


__all__ = ["SHARD_ATTRS", "Shard", "check_shards", "merge_shards", "plan_shards", "recorded_bounds",
           "remove_shards", "shard_bounds", "shard_path", "shard_problems"]
