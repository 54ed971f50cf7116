"""FineTuneRanker.fit on the tiny world, run by tests/test_finetune_ddp.py in one process and
under `python -m torch.distributed.run --nproc-per-node N` (gloo, CPU).

    python tests/_ddp_finetune.py WORLD OUT SCENARIOS_JSON

SCENARIOS_JSON maps a name to {"config": FineTuneConfig.to_dict(), "impressions": n,
"resume_at": epoch or null}. Each scenario trains on the first n impressions of the carved
train split; with `resume_at` it first fits `resume_at` epochs into OUT/<name>/checkpoints,
then fits the configured epochs from there (every rank resumes). Dropout is off everywhere
(the NRMS head by its config, tiny BERT's own here), so N processes can equal one.

Every rank writes OUT/<name>/rank-<r>.json (a digest of its final weights, resumed_from, the
paths `save` and `export_features` returned: every rank calls them, rank 0 alone writes);
rank 0 also writes report.json (fit history, chosen epoch, validation metrics, dev metrics)
and dev_scores.npy. Every rank also writes OUT/sums-<r>.json: what
`distributed.all_reduce_sum_list` gave for entries that are None on every rank, on some, on none.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch


def run(world: Path, out: Path, scenarios: dict) -> None:
    from extractors import text
    from rankers import distributed
    from rankers.data import carve_validation, load_impressions
    from rankers.finetune import FineTuneConfig, FineTuneRanker
    from rankers.metrics import evaluate
    from storage.catalogue import load_catalogue

    saved = dict(text.TINY_TEXT)
    text.TINY_TEXT.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    try:
        with distributed.session("cpu") as ctx:
            like = [torch.zeros(2), torch.zeros(3), torch.zeros(1)]
            mine = [None, torch.full((3,), 1.0) if ctx.is_main else None, torch.full((1,), ctx.rank + 1.0)]
            sums = [None if t is None else t.tolist() for t in distributed.all_reduce_sum_list(mine, like)]
            out.mkdir(parents=True, exist_ok=True)
            (out / f"sums-{ctx.rank}.json").write_text(json.dumps(sums))
            catalogue = load_catalogue(world)
            train, valid = carve_validation(load_impressions(world, "train", catalogue))
            dev = load_impressions(world, "dev", catalogue)
            for name, scenario in scenarios.items():
                config = FineTuneConfig.from_dict(scenario["config"])
                part = train.select(np.arange(len(train)) < scenario["impressions"])
                folder = out / name
                folder.mkdir(parents=True, exist_ok=True)
                checkpoints = folder / "checkpoints" if scenario.get("resume_at") else None
                if checkpoints is not None:
                    first = FineTuneConfig.from_dict({**scenario["config"], "ranker": {
                        **scenario["config"]["ranker"], "epochs": scenario["resume_at"]}})
                    FineTuneRanker(catalogue, first, device="cpu", progress=False).fit(
                        part, valid, checkpoint_dir=checkpoints)
                ranker = FineTuneRanker(catalogue, config, device="cpu", progress=False)
                report = ranker.fit(part, valid, checkpoint_dir=checkpoints)
                digest = hashlib.sha256()
                for key, value in sorted(ranker.model.state_dict().items()):
                    digest.update(key.encode())
                    digest.update(value.numpy().tobytes())
                saved_files = ranker.save(folder / "model")
                stores = ranker.export_features(folder / "features", dtype="float32")
                (folder / f"rank-{ctx.rank}.json").write_text(json.dumps({
                    "weights": digest.hexdigest(), "resumed_from": ranker.resumed_from,
                    "saved": [str(p) for p in saved_files], "stores": {r: str(p) for r, p in stores.items()}}))
                if ctx.is_main:
                    scores = ranker.score(dev)
                    np.save(folder / "dev_scores.npy", scores)
                    (folder / "report.json").write_text(json.dumps({
                        "epochs": report.epochs, "best_epoch": report.best_epoch,
                        "valid": report.valid_metrics, "history": report.history,
                        "dev": evaluate(dev.cand_offsets, dev.labels, scores)}, default=float))
                distributed.barrier()
    finally:
        text.TINY_TEXT.clear()
        text.TINY_TEXT.update(saved)


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]))
