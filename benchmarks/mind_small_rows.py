"""Issue 13's first table at MIND-small size, the rows the other benchmarks do not measure.

    .venv/bin/python benchmarks/mind_small_rows.py [--scale mind-small] [--rows extraction,loading,startup]

- extraction: `flows.extract --extractor vit` (tiny) over every news and card of the world,
  before (cards decoded in the main process, `--workers 0`, the old default on a CPU) and now
  (the default: one DataLoader worker per core), each into a fresh folder, in this run;
- loading: what a ranking run reads before it trains, before (the catalogue, then each split
  read on its own with its news.tsv parsed again, as flows.rank did: 6 parses of a news.tsv)
  and now (runs.workspace: each news.tsv and behaviors.tsv parsed once), with the parses
  counted;
- cards: would a cache of title-only cards pay? A news without a cover gets a card drawn from
  its title at each image extraction (extractors.images.CardDataset); a cache would write it
  once as a PNG (with a checksum, since data read back is verified) and read it back later.
  Timed over the world's first 2,000 titles without a cover, in this process (measured: it
  does not pay, so extraction draws the cards);
- startup: a bad plan refused by `python -m flows.compare` (no Prefect server is started), and
  a temporary Prefect server's start, each timed from the outside.
LightGBM and NRMS rows: benchmarks/lgbm.py and benchmarks/rank_train.py. The world is made
once under benchmarks/.cache/ (with its cards). Prints the machine, its load and a table.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def world(cache: Path, scale: str) -> Path:
    from storage.synthetic import generate_world

    out = cache / f"{scale}-seed0-cards"
    generate_world(out, scale=scale, seed=0)
    return out


def extraction(data: Path, workers: int | None) -> tuple[float, int]:
    """Seconds and workers of a tiny-ViT extraction with `workers` (None: the default)."""
    from extractors.registry import create
    from extractors.run import default_workers, extract_catalogue
    from storage.catalogue import load_catalogue

    catalogue = load_catalogue(data)
    extractor = create("vit")
    chosen = default_workers("cpu", len(catalogue)) if workers is None else workers
    with tempfile.TemporaryDirectory(prefix="vit-bench-") as out:
        started = time.perf_counter()
        extract_catalogue(extractor, catalogue, Path(out), device="cpu", num_workers=chosen, progress=False)
        return time.perf_counter() - started, chosen


def loading(data: Path, old: bool) -> tuple[float, Counter]:
    """Seconds and parses (by file) of loading the catalogue and the train, valid and dev splits."""
    import storage.catalogue
    import storage.mind
    from rankers.data import carve_validation, to_catalogue
    from runs.workspace import Workspace

    parsed: Counter = Counter()
    real_news, real_behaviors = storage.mind.read_news, storage.mind.read_behaviors

    def news(path, *a, **k):
        parsed[str(Path(path).relative_to(data))] += 1
        return real_news(path, *a, **k)

    def behaviors(path, *a, **k):
        parsed[str(Path(path).relative_to(data))] += 1
        return real_behaviors(path, *a, **k)

    storage.mind.read_news = storage.catalogue.read_news = news
    storage.mind.read_behaviors = behaviors
    import rankers.data

    rankers.data.read_behaviors = behaviors
    try:
        started = time.perf_counter()
        if old:  # flows.rank before issue 10: the catalogue, then each split read whole again
            catalogue = storage.catalogue.load_catalogue(data)
            for split in ("train", "dev", "test"):
                loaded = storage.mind.load_split(data / split)
                impressions = to_catalogue(loaded.behaviors, loaded.news, catalogue, split)
                if split == "train":
                    carve_validation(impressions)
        else:
            ws = Workspace()
            catalogue = ws.catalogue(data)
            ws.train_valid(data, catalogue)
            ws.impressions(data, "dev", catalogue)
        return time.perf_counter() - started, parsed
    finally:
        storage.mind.read_news = storage.catalogue.read_news = real_news
        storage.mind.read_behaviors = rankers.data.read_behaviors = real_behaviors


def cards(data: Path, n: int = 2000) -> dict:
    """Would a cache of title-only cards pay? Milliseconds per card: draw it (what extraction
    does, storage.cards.render_card); draw it and write it as a PNG carrying its pixels'
    CRC-32 (a cache's first extraction); read such a PNG back and check the CRC (every later
    one); and the resize each then gets. The mean PNG size."""
    import zlib

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from storage.cards import render_card
    from storage.catalogue import load_catalogue

    catalogue = load_catalogue(data)
    uncovered = [i for i in range(len(catalogue)) if catalogue.image_path(i) is None]
    titles = [(str(catalogue.title[i]), str(catalogue.category[i])) for i in uncovered[:n]]

    def per_card(fn) -> float:
        started = time.perf_counter()
        for k, (title, category) in enumerate(titles):
            fn(k, title, category)
        return (time.perf_counter() - started) / len(titles) * 1e3

    with tempfile.TemporaryDirectory(prefix="cards-bench-") as folder:
        def write(k, title, category):
            card = render_card(title, category)
            info = PngInfo()
            info.add_text("crc32", str(zlib.crc32(card.tobytes())))
            card.save(Path(folder) / f"{k}.png", "PNG", compress_level=1, pnginfo=info)

        def read(k, title, category):
            with Image.open(Path(folder) / f"{k}.png") as img:
                img.load()
                assert img.text["crc32"] == str(zlib.crc32(img.tobytes()))

        drawn = per_card(lambda k, t, c: render_card(t, c))
        written = per_card(write)
        read_back = per_card(read)
        kb = sum(p.stat().st_size for p in Path(folder).iterdir()) / len(titles) / 1e3
    card = render_card(*titles[0])
    resize = per_card(lambda k, t, c: card.resize((224, 224), Image.BICUBIC))
    return {"n": len(titles), "uncovered": len(uncovered), "render_ms": drawn, "written_ms": written,
            "read_ms": read_back, "resize_ms": resize, "png_kb": kb}


def startup() -> dict:
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # nothing answers: nothing may reach it
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flows.compare", "--sources", "concat", "--rankers", "lightgbm"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    refused = time.perf_counter() - started
    assert done.returncode == 1 and "cannot train on --fusion concat" in done.stderr, done.stderr
    from flows.server import TemporaryServer, startup_timeout

    server = TemporaryServer()
    started = time.perf_counter()
    try:
        server.start(startup_timeout())
        up = time.perf_counter() - started
    finally:
        server.stop()
    return {"refused_s": refused, "server_s": up}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", default="mind-small", choices=["tiny", "small", "mind-small"])
    p.add_argument("--rows", default="extraction,loading,cards,startup")
    p.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache")
    args = p.parse_args(argv)
    rows = {r.strip() for r in args.rows.split(",")}
    import torch

    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    data = world(args.cache, args.scale)
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch "
          f"{torch.__version__}; 1-min load {load0:.1f} at the start; world {data.name}")
    table = []
    if "extraction" in rows:
        from storage.catalogue import load_catalogue

        n = len(load_catalogue(data))
        for label, workers in (("before: --workers 0", 0), ("now: default workers", None)):
            seconds, chosen = extraction(data, workers)
            table.append(("tiny ViT extraction", f"{label} ({chosen})", f"{seconds:.0f} s", f"{n / seconds:,.0f} news/s"))
    if "loading" in rows:
        for label, old in (("before: catalogue + each split whole", True), ("now: runs.workspace", False)):
            seconds, parsed = loading(data, old)
            news = sum(v for k, v in parsed.items() if k.endswith("news.tsv"))
            table.append(("loading before training", label, f"{seconds:.1f} s",
                          f"{news} news.tsv parses, {sum(parsed.values()) - news} behaviors.tsv"))
    if "cards" in rows:
        c = cards(data)
        saved = (c["render_ms"] - c["read_ms"]) * c["uncovered"] / 1e3
        extra = (c["written_ms"] - c["render_ms"]) * c["uncovered"] / 1e3
        table.append(("title-only card, drawn (now)", f"draw + resize to 224 ({c['n']} cards)",
                      f"{c['render_ms'] + c['resize_ms']:.2f} ms", f"{c['uncovered']:,} news without a cover"))
        table.append(("title-only card, a cache's first extraction", "draw, write the PNG + resize",
                      f"{c['written_ms'] + c['resize_ms']:.2f} ms", f"{c['png_kb']:.1f} KB a card, "
                      f"{c['png_kb'] * c['uncovered'] / 1e3:,.0f} MB; {extra:.0f} s of one core more"))
        table.append(("title-only card, a cache's later extractions", "read, check the CRC + resize",
                      f"{c['read_ms'] + c['resize_ms']:.2f} ms", f"{saved:.0f} s of one core saved"))
    if "startup" in rows:
        s = startup()
        table.append(("a bad plan refused", "flows.compare --sources concat --rankers lightgbm", f"{s['refused_s']:.1f} s",
                      "no server started"))
        table.append(("temporary Prefect server", "start until /health answers", f"{s['server_s']:.1f} s", ""))
    print(f"\n| row | path | time | what |\n|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    print(f"\n1-min load {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
