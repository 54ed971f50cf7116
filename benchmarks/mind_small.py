"""What benchmarks/lgbm.py and benchmarks/rank_train.py share: the mind-small synthetic world,
its feature stores, today's code path, and the measures.

- `splits()`: the synthetic `mind-small` world (64,887 news; 157k train impressions, the
  last day carved out as valid; 73k dev impressions) under benchmarks/.cache, generated
  without cover images on first use (about 16 s);
- `text_store(catalogue)`: tiny BERT's pooled vectors (64-d) extracted once into
  benchmarks/.cache/features (about 11 s on 2 cores); `random_store` a stand-in of any
  width (an image store: present for 44% of news, as IM-MIND's covers);
- `baseline(name)`: a module of rankers/ as it was at BASELINE_COMMIT (before this round of
  speed work), copied out of git into benchmarks/.cache/baseline and imported under
  `old_rankers`, its imports of the other copied modules rewritten, so both paths run in
  one benchmark;
- `reset_peak()` / `peak_gb()`: the process's peak resident memory (VmHWM) since the last
  reset (Linux), so a child process measures what one step of it needed.
"""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

CACHE = Path(__file__).resolve().parent / ".cache"
ROOT = Path(__file__).resolve().parents[1]
BASELINE_COMMIT = "72c77012e5b895cb69af62b60ae0a0292ec6c541"
COPIED = ("lgbm", "train", "nrms", "attention")  # the modules whose old versions are copied


def world(seed: int = 0) -> Path:
    from storage.synthetic import generate_world

    out = CACHE / f"mind-small-seed{seed}"
    generate_world(out, scale="mind-small", seed=seed, images=False)
    return out


def splits(seed: int = 0):
    """(catalogue, train, valid, dev) of the mind-small world, valid carved from train's last day."""
    from rankers.data import carve_validation, load_impressions
    from storage.catalogue import load_catalogue

    root = world(seed)
    catalogue = load_catalogue(root)
    train, valid = carve_validation(load_impressions(root, "train", catalogue))
    return catalogue, train, valid, load_impressions(root, "dev", catalogue)


def text_store(catalogue):
    """tiny BERT's pooled text vectors of every news (NewsFeatures), extracted once."""
    from extractors.registry import create
    from extractors.run import extract_catalogue
    from rankers.data import load_features

    work = CACHE / "work"
    bert = create("bert", titles=[str(t) for t in catalogue.title], workdir=work)
    result = extract_catalogue(bert, catalogue, CACHE / "features", device="cpu", progress=False, tokens=False)
    return load_features(result.path, catalogue, tokens=False)


def random_store(n: int, dim: int, modality: str = "image", cover_rate: float = 0.44, seed: int = 5):
    """(N, dim) standard normal float32 vectors, present for a seeded `cover_rate` of news."""
    from rankers.data import NewsFeatures

    rng = np.random.default_rng(seed)
    return NewsFeatures(f"random-{dim}", modality, rng.standard_normal((n, dim), dtype=np.float32),
                        rng.random(n) < cover_rate)


def baseline(name: str):
    """rankers.<name> as it was at BASELINE_COMMIT, imported as old_rankers.<name>."""
    package = CACHE / "baseline" / BASELINE_COMMIT[:12] / "old_rankers"
    if not (package / "__init__.py").is_file():
        package.mkdir(parents=True, exist_ok=True)
        for module in COPIED:
            source = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:rankers/{module}.py"], cwd=ROOT,
                                    capture_output=True, text=True, check=True).stdout
            for other in COPIED:
                source = source.replace(f"from rankers.{other} import", f"from old_rankers.{other} import")
            (package / f"{module}.py").write_text(source)
        (package / "__init__.py").write_text("")
    if str(package.parent) not in sys.path:
        sys.path.insert(0, str(package.parent))
    return importlib.import_module(f"old_rankers.{name}")


def reset_peak() -> None:
    """Start the peak-memory count again from the current resident memory (Linux clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_gb() -> float:
    """Peak resident memory in GiB since the last `reset_peak` (or since the start)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def machine() -> str:
    import torch

    return (f"{platform.platform()}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
            f"Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}")


def load() -> float:
    """The 1-minute load average (other work on a shared machine slows every figure)."""
    return os.getloadavg()[0]
