"""A feature-store writer run as a separate process by the kill -9 tests.

It writes a deterministic store (every value is a function of its row, so any split into
chunks and any number of restarts give the same content) chunk by chunk, resuming whatever
partial it finds. It prints `start`, `begin <row>` before each chunk and `finalize`, so the
test knows what was in flight when it killed the process. `--spin` burns CPU between
chunks (no sleep) to stretch the run. `--extras NAME=WIDTH,...` declares extra vectors
(StoreMeta.extras), written with every chunk.

`--stall CALL:PHASE:N` freezes the writer at one exact step so that the test can kill it
there: on the N-th call of CALL while in PHASE (`create`, a chunk's first row, `finalize`) it
prints `stalled` and spins forever. CALL is an `os` function the store calls (`pwrite`
first writes half of its bytes, a torn write; `fdatasync`, `fsync`, `replace` stall before
the call) or `modify` (h5py attribute overwrite in finalize; stalls after it, with HDF5
metadata dirty in memory).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from storage.features import FeatureWriter, StoreMeta

FINGERPRINT = "sha256:kill-test-world"


def make_meta(dim: int, token_len: int | None, fingerprint: str = FINGERPRINT,
              dtype: str = "float32", checkpoint: str = "tiny/kill-test",
              extras: dict[str, int] | None = None) -> StoreMeta:
    return StoreMeta(extractor="tiny-text", checkpoint=checkpoint, revision="r1", mode="frozen",
                     preprocess={"max_len": token_len or 0, "pooling": "mean"}, fingerprint=fingerprint,
                     dim=dim, dtype=dtype, token_len=token_len, extras=dict(extras or {}))  # type: ignore[arg-type]


def make_ids(rows: int) -> list[str]:
    return [f"N{10_000 + 7 * r}" for r in range(rows)]


def make_rows(start: int, stop: int, dim: int, token_len: int | None):
    """vectors (K, D), present (K,), tokens (K, L, D) | None, mask (K, L) | None for rows start..stop-1."""
    r = np.arange(start, stop, dtype=np.float64)[:, None]  # (K, 1)
    j = np.arange(dim, dtype=np.float64)[None, :]  # (1, D)
    vectors = np.sin(0.37 * r + 1.3 * j) * (1.0 + r % 7)  # (K, D)
    present = (np.arange(start, stop) % 5) != 0  # (K,)
    if token_len is None:
        return vectors, present, None, None
    t = np.arange(token_len, dtype=np.float64)[None, :, None]  # (1, L, 1)
    tokens = np.cos(0.11 * r[:, :, None] + 0.7 * t + 0.05 * j[:, None, :])  # (K, L, D)
    mask = np.arange(token_len)[None, :] < (1 + np.arange(start, stop)[:, None] % token_len)  # (K, L)
    return vectors, present, tokens, mask


def make_extras(start: int, stop: int, extras: dict[str, int] | None) -> dict[str, np.ndarray] | None:
    """{name: (K, E)} for rows start..stop-1, each name its own function of the row; None without extras."""
    if not extras:
        return None
    r = np.arange(start, stop, dtype=np.float64)[:, None]  # (K, 1)
    out = {}
    for k, (name, width) in enumerate(sorted(extras.items())):
        e = np.arange(width, dtype=np.float64)[None, :]  # (1, E)
        out[name] = np.tanh(0.23 * r - 0.9 * e + k)  # (K, E)
    return out


def parse_extras(text: str) -> dict[str, int]:
    """`a=3,b=5` -> {"a": 3, "b": 5}; '' -> {}."""
    return {name: int(width) for name, width in (part.split("=") for part in text.split(",") if part)}


_phase: dict[str, str | None] = {"now": None}


def _stall_forever() -> None:
    print("stalled", flush=True)
    while True:
        pass


def install_stall(spec: str) -> None:
    """Freeze on the N-th call of CALL during PHASE (see module docstring)."""
    call, phase, nth = spec.split(":")
    calls = 0
    manager = h5py._hl.attrs.AttributeManager
    real = manager.modify if call == "modify" else getattr(os, call)

    def wrapper(*args, **kwargs):
        nonlocal calls
        if _phase["now"] == phase:
            calls += 1
            if calls == int(nth):
                if call == "pwrite":
                    fd, data, offset = args
                    real(fd, data[: len(data) // 2], offset)
                elif call == "modify":
                    real(*args, **kwargs)
                _stall_forever()
        return real(*args, **kwargs)

    if call == "modify":
        manager.modify = wrapper
    else:
        setattr(os, call, wrapper)


def write_store(path: Path, rows: int, chunk: int, dim: int, token_len: int | None,
                spin: int = 0, report: bool = False, extras: dict[str, int] | None = None) -> Path:
    if report:
        print("start", flush=True)
    _phase["now"] = "create"
    writer = FeatureWriter(path, make_meta(dim, token_len, extras=extras), make_ids(rows))
    burn = 0
    for start in range(writer.next_row, rows, chunk):
        for i in range(spin):
            burn ^= i
        batch = make_rows(start, min(start + chunk, rows), dim, token_len)
        more = make_extras(start, min(start + chunk, rows), extras)
        _phase["now"] = str(start)
        if report:
            print(f"begin {start}", flush=True)
        writer.write(*batch, extras=more)
    _phase["now"] = "finalize"
    if report:
        print("finalize", flush=True)
    return writer.finalize()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", type=Path)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--chunk", type=int, default=10)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--token-len", type=int, default=0)
    parser.add_argument("--spin", type=int, default=0)
    parser.add_argument("--extras", default="", help="NAME=WIDTH,... extra vectors to declare and write")
    parser.add_argument("--stall", default=None, help="CALL:PHASE:N, see the module docstring")
    args = parser.parse_args(argv)
    if args.stall:
        install_stall(args.stall)
    write_store(args.path, args.rows, args.chunk, args.dim, args.token_len or None, args.spin, report=True,
                extras=parse_extras(args.extras))
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
