"""Child process for the kill test: extract one tiny store slowly enough to be killed mid-way."""

import sys
import time
from pathlib import Path

from extractors.registry import create
from extractors.run import extract_catalogue
from storage.catalogue import load_catalogue

data, features, spec = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
catalogue = load_catalogue(data)
extractor = create(spec, titles=[str(t) for t in catalogue.title], workdir=features / "work")
forward = extractor.forward


def slow_forward(*args, **kwargs):
    time.sleep(0.05)  # stretches the run so the parent can kill it between commits
    return forward(*args, **kwargs)


extractor.forward = slow_forward
extract_catalogue(extractor, catalogue, features, batch_size=8, chunk_rows=16, device="cpu", progress=False)
