"""Benchmark reading a feature store with and without checksum verification (issues 11, 13).

    .venv/bin/python benchmarks/store_read.py [--rows 65238] [--dim 768] [--token-len 32]
                                              [--repeats 3] [--dir DIR] [--keep]

Writes one MIND-small-sized store (65,238 news, 768-d float16 vectors, 32 x 768 float16 token
vectors with mask: about 3.3 GB) with `FeatureWriter`, then times each way of reading it in
a fresh child process, so that every row reports its own peak memory (VmHWM: unlike
ru_maxrss it is not inherited from the parent across fork and exec):
- pooled: the vectors a pooled ranker needs. Baseline: plain h5py reads of ids, present and
  vectors (no checks). Old path: what `load_features(tokens=False)` did before issue 13
  (the whole store, tokens included, read and dropped). Ours: `FeatureStore.open` +
  `load(tokens=False)`, every block verified.
- full: everything in memory. Baseline: plain h5py reads; ours: `load(tokens=True)`.
- lazy: tokens as a memmap. Baseline: a bare memmap (no checks); ours: `load(tokens="lazy")`,
  i.e. one streaming pass verifying every token block, then the map.
- info: `storage.features.verify`, every checksum of the file.
Each runs with a warm page cache (the file was just read) and a cold one (the file's pages
dropped with posix_fadvise(DONTNEED) after an fsync; no root needed). MB = bytes of the
store's datasets the step reads (ids not counted), MB/s = MB / seconds; each row is the
fastest of --repeats runs, taken in rounds over all rows so that a burst of other work on a
shared machine spreads over the rows instead of landing on one.
SHA-256 throughput on an in-memory buffer, one thread, is printed as the per-core ceiling of
verification; verification hashes blocks on up to 8 threads. It prints the machine and a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import storage.features as features  # noqa: E402
from storage.features import FeatureStore, FeatureWriter, StoreMeta, verify  # noqa: E402

CHUNK = 1024
MB = 1e6


def write_store(path: Path, rows: int, dim: int, token_len: int) -> float:
    """A store of random float16 rows (one random pool, shifted per chunk); returns seconds."""
    meta = StoreMeta(extractor="bench", checkpoint="bench/random", revision="", mode="frozen",
                     preprocess={"modality": "text"}, fingerprint="sha256:bench", dim=dim, dtype="float16",
                     token_len=token_len)
    rng = np.random.default_rng(0)
    pool_vec = rng.standard_normal((2 * CHUNK, dim)).astype(np.float16)  # (2B, D)
    pool_tok = rng.standard_normal((2 * CHUNK, token_len, dim)).astype(np.float16)  # (2B, L, D)
    lengths = rng.integers(4, token_len + 1, rows)  # (N,)
    started = time.perf_counter()
    with FeatureWriter(path, meta, [f"N{i}" for i in range(rows)], restart=True) as writer:
        for k, start in enumerate(range(0, rows, CHUNK)):
            stop = min(start + CHUNK, rows)
            shift = (k * 97) % CHUNK
            n = stop - start
            mask = np.arange(token_len)[None, :] < lengths[start:stop, None]  # (n, L)
            writer.write(pool_vec[shift:shift + n], np.ones(n, dtype=bool), pool_tok[shift:shift + n], mask)
        writer.finalize()
    return time.perf_counter() - started


# --------------------------------------------------------------------------- child steps


def _h5(path: Path):
    import h5py

    return h5py.File(path, "r", locking=False)


def step_pooled_baseline(path: Path) -> int:
    with _h5(path) as f:
        f["news_ids"].asstr()[:]
        present, vectors = f["present"][:], f["vectors"][:]
    return present.nbytes + vectors.nbytes


def step_pooled_old(path: Path) -> int:
    """The pre-issue-13 load_features(tokens=False): FeatureStore.load() read every dataset,
    then only the vectors were kept (as float32)."""
    with _h5(path) as f:
        f["news_ids"].asstr()[:]
        arrays = {name: f[name][:] for name in ("present", "tokens", "mask", "vectors")}
    nbytes = sum(a.nbytes for a in arrays.values())
    vectors = arrays["vectors"].astype(np.float32)  # noqa: F841 (what the ranker keeps)
    return nbytes


def step_pooled_verified(path: Path) -> int:
    with FeatureStore.open(path) as store:
        arrays = store.load(tokens=False)
    return arrays.vectors.nbytes + arrays.present.nbytes


def step_full_baseline(path: Path) -> int:
    with _h5(path) as f:
        f["news_ids"].asstr()[:]
        return sum(f[name][:].nbytes for name in ("present", "vectors", "tokens", "mask"))


def step_full_verified(path: Path) -> int:
    with FeatureStore.open(path) as store:
        arrays = store.load(tokens=True)
    return sum(a.nbytes for a in (arrays.vectors, arrays.present, arrays.tokens, arrays.mask))


def step_lazy_baseline(path: Path) -> int:
    with _h5(path) as f:
        f["news_ids"].asstr()[:]
        present, vectors, mask = f["present"][:], f["vectors"][:], f["mask"][:]
        dset = f["tokens"]
        np.memmap(path, dtype=dset.dtype, mode="c", offset=dset.id.get_offset(), shape=dset.shape)
    return present.nbytes + vectors.nbytes + mask.nbytes  # the tokens are mapped, not read


def step_lazy_verified(path: Path) -> int:
    with FeatureStore.open(path) as store:
        arrays = store.load(tokens="lazy")
    # Every token byte is read once by the verifying pass, then mapped.
    return sum(a.nbytes for a in (arrays.vectors, arrays.present, arrays.tokens, arrays.mask))


def step_info(path: Path) -> int:
    verdict = verify(path)
    assert verdict.ok, verdict.detail
    with _h5(path) as f:
        return sum(f[name].id.get_storage_size() for name in ("present", "vectors", "tokens", "mask"))


STEPS = {
    "pooled-baseline": step_pooled_baseline, "pooled-old": step_pooled_old, "pooled-verified": step_pooled_verified,
    "full-baseline": step_full_baseline, "full-verified": step_full_verified,
    "lazy-baseline": step_lazy_baseline, "lazy-verified": step_lazy_verified, "info": step_info,
}


def child(step: str, path: Path) -> None:
    started = time.perf_counter()
    nbytes = STEPS[step](path)
    seconds = time.perf_counter() - started
    status = Path("/proc/self/status").read_text().splitlines()
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))  # kB
    print(json.dumps({"seconds": seconds, "bytes": nbytes, "peak": peak}))


# --------------------------------------------------------------------------- parent


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_step(step: str, path: Path, cold: bool) -> dict:
    if cold:
        drop_cache(path)
    else:  # warm: read the file once so that every step starts from the page cache
        with open(path, "rb") as fh:
            while fh.read(64 << 20):
                pass
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, __file__, "--child", step, "--path", str(path)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def sha256_rate() -> float:
    buf = np.random.default_rng(1).integers(0, 255, 256 << 20, dtype=np.uint8)
    hashlib.sha256(buf[: 16 << 20]).digest()
    started = time.perf_counter()
    hashlib.sha256(buf).digest()
    return buf.nbytes / (time.perf_counter() - started)


ROWS = [
    ("pooled", "pooled-baseline", "h5py: ids, present, vectors (no checks)"),
    ("pooled", "pooled-old", "old load_features(tokens=False): whole store read"),
    ("pooled", "pooled-verified", "ours: load(tokens=False), verified"),
    ("full", "full-baseline", "h5py: every dataset (no checks)"),
    ("full", "full-verified", "ours: load(tokens=True), verified"),
    ("lazy", "lazy-baseline", "bare memmap of tokens (no checks)"),
    ("lazy", "lazy-verified", 'ours: load(tokens="lazy"), tokens verified'),
    ("info", "info", "verify(): every checksum"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=65_238)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--token-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; the fastest is shown")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the store (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the store afterwards")
    parser.add_argument("--child", choices=sorted(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.path)
        return

    folder = Path(tempfile.mkdtemp(prefix="store-read-", dir=args.dir))
    path = folder / "bench.h5"
    try:
        print(f"machine: {platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}, "
              f"numpy {np.__version__}, load {os.getloadavg()[0]:.2f}, hashing threads {features._HASH_THREADS}")
        print(f"sha256 on an in-memory buffer, one thread: {sha256_rate() / MB:,.0f} MB/s")
        seconds = write_store(path, args.rows, args.dim, args.token_len)
        size = path.stat().st_size
        print(f"store: {args.rows:,} rows, vectors ({args.rows}, {args.dim}) float16, tokens "
              f"({args.rows}, {args.token_len}, {args.dim}) float16 + mask; {size / MB:,.0f} MB on disk, "
              f"written (hashing included) in {seconds:.1f} s = {size / MB / seconds:,.0f} MB/s")
        print()
        print("| read | cache | MB | seconds | MB/s | peak RSS MB |")
        print("|---|---|---|---|---|---|")
        for cache in ("warm", "cold"):
            runs: dict[str, list[dict]] = {step: [] for _, step, _ in ROWS}
            for _ in range(args.repeats):
                for _, step, _ in ROWS:
                    runs[step].append(run_step(step, path, cold=cache == "cold"))
            for _, step, label in ROWS:
                got = min(runs[step], key=lambda r: r["seconds"])
                print(f"| {label} | {cache} | {got['bytes'] / MB:,.0f} | {got['seconds']:.2f} | "
                      f"{got['bytes'] / MB / got['seconds']:,.0f} | {got['peak'] / MB:,.0f} |", flush=True)
        print(f"\nload after: {os.getloadavg()[0]:.2f}")
    finally:
        if args.keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
