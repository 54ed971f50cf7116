"""Published configurations as comparison presets: `python -m flows.compare --preset NAME`.

A preset is a list of runs (ranker kind, fusion, frozen or fine-tuned, which extractor spec
feeds each role, MTRec's switches, hyperparameters), which run each is paired with in the
report, the baselines, and the published numbers printed beside ours in the thesis-format
table. runs.compare turns a preset into ranking runs (`plan`) and one report.

- `plm-nr`: NRMS over frozen BERT token vectors, then NRMS + BERT fine-tuned end to end
  (PLM-NR), and NRMS + DistilBERT fine-tuned when `--distil bert:CKPT` names a DistilBERT
  (the embedded tiny models have no distilled counterpart).
- `mtrec`: BERT fine-tuned without auxiliary tasks, MTRec (category + NER tasks with
  gradient surgery), and MTRec without each part (the published ablations).
- `zhao2024`: the four experiments of the multimodal thesis (frozen BLIP; frozen BERT + ViT,
  Hadamard; fine-tuned BERT + ViT, Hadamard; fine-tuned BERT) with random, plus one run the
  thesis lacks: NRMS over frozen BERT alone, so the frozen image run has a text-only run
  with the same training to be compared with. Its table, with our intervals, is also
  written to `thesis.md`.

Hyperparameters. With real checkpoints (`--text bert:bert-base-uncased` etc.) fine-tuned runs
use the published NRMS+BERT settings on MIND-small, `PUBLISHED_FINETUNE` (3 epochs, AdamW
1e-4 for the ranker, 2e-5 for the PLM, batch 32 x 4 accumulated = 128, K = 4, history 50,
titles up to 32 tokens; the thesis trained the same PLM-NR, 3 epochs per experiment). On the
embedded default (`tiny` checkpoints, the synthetic world) they use flows.rank's tiny scale
(`TINY_FINETUNE_HEAD`: d 32, history 20, lr 3e-3, no accumulation; the library's tiny
encoder rate 1e-3), which trains in seconds per epoch on the tiny world. Frozen runs use
flows.rank's NRMS defaults (AdamW 1e-3, up to `--epochs`, early stopping) at both scales.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Fine-tuning as published for NRMS+BERT on MIND-small (docs: SEEDS.md section 2); the
# library's defaults are the same, stated here so a preset does not drift with them.
PUBLISHED_FINETUNE = {"epochs": 3, "lr": 1e-4, "encoder_lr": 2e-5, "accumulate": 4}


@dataclass(frozen=True)
class PresetRun:
    """One run of a preset. `text` names the command-line spec that feeds the text role:
    "text" (`--text`) or "distil" (`--distil`); a run whose spec is not given is skipped."""

    label: str
    fusion: str = "text"  # text | image | blip | hadamard | concat | gated
    finetune: bool = False
    tokens: bool = False  # frozen NRMS attends over the stores' token vectors (as PLM-NR does)
    mtrec: dict | None = None  # {"category", "ner", "surgery"} switches; None: no MTRec tasks
    text: str = "text"
    reference: str | None = None  # the label this run is paired with (None: the preset's reference)
    published: dict = field(default_factory=dict)  # RankParams values used with real checkpoints


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    runs: tuple[PresetRun, ...]
    reference: str  # the main reference run (baselines are paired with it)
    baselines: tuple[str, ...] = ("random", "popularity", "oracle")
    published: tuple[dict, ...] = ()  # {"name", "metrics", "source"}: shown beside ours, not runs
    notes: tuple[str, ...] = ()
    thesis: bool = False  # write thesis.md: the runs in the thesis's table format with our intervals


def _published(name: str, source: str, auc: float, mrr: float, ndcg5: float, ndcg10: float) -> dict:
    return {"name": name, "source": source, "metrics": {"auc": auc, "mrr": mrr, "ndcg@5": ndcg5, "ndcg@10": ndcg10}}


def _mtrec(category: bool = True, ner: bool = True, surgery: bool = True) -> dict:
    return {"category": category, "ner": ner, "surgery": surgery}


FROZEN_BERT = "nrms · bert (frozen)"
TUNED_BERT = "plm-nr · bert (fine-tuned)"
MIND_SMALL = "published, MIND-small dev"

PLM_NR = Preset(
    name="plm-nr",
    title="PLM-NR: NRMS with a fine-tuned pre-trained language model",
    runs=(
        PresetRun(FROZEN_BERT, tokens=True),
        PresetRun(TUNED_BERT, finetune=True, reference=FROZEN_BERT, published=PUBLISHED_FINETUNE),
        PresetRun("plm-nr · distilbert (fine-tuned)", finetune=True, text="distil", reference=FROZEN_BERT,
                  published=PUBLISHED_FINETUNE),
    ),
    reference=FROZEN_BERT,
    published=(
        _published("NRMS + BERT-base", MIND_SMALL, 0.689, 0.306, 0.336, 0.400),
        _published("NRMS + DistilBERT", MIND_SMALL, 0.674, 0.297, 0.322, 0.387),
    ),
    notes=("Fine-tuned runs are paired with NRMS over the frozen BERT's token vectors: the same ranker, "
           "only the extractor's training differs.",),
)

MTREC = Preset(
    name="mtrec",
    title="MTRec: multi-task fine-tuning of the news encoder, and its ablations",
    runs=(
        PresetRun(TUNED_BERT, finetune=True, published=PUBLISHED_FINETUNE),
        PresetRun("mtrec", finetune=True, mtrec=_mtrec(), published=PUBLISHED_FINETUNE),
        PresetRun("mtrec without category", finetune=True, mtrec=_mtrec(category=False), published=PUBLISHED_FINETUNE),
        PresetRun("mtrec without ner", finetune=True, mtrec=_mtrec(ner=False), published=PUBLISHED_FINETUNE),
        PresetRun("mtrec without surgery", finetune=True, mtrec=_mtrec(surgery=False), published=PUBLISHED_FINETUNE),
    ),
    reference=TUNED_BERT,
    published=(
        _published("BERT baseline", MIND_SMALL, 0.6826, 0.3252, 0.3589, 0.4233),
        _published("NRMS + BERT", MIND_SMALL, 0.6860, 0.3297, 0.3655, 0.4278),
        _published("MTRec", MIND_SMALL, 0.6943, 0.3379, 0.3764, 0.4374),
    ),
    notes=("Every MTRec run is paired with the same fine-tuned BERT without auxiliary tasks. Our news encoder is "
           "PLM-NR's (self-attention and additive attention over BERT's tokens), MTRec's baseline pools [CLS]; "
           "AMF and the original symmetric surgery are not implemented.",),
)

ZHAO = "Zhao 2024, MIND-small"
EXP1 = "1: frozen BLIP + trained ranker"
EXP2 = "2: frozen BERT + frozen ViT, Hadamard"
EXP3 = "3: fine-tuned BERT + ViT, Hadamard"
EXP4 = "4: fine-tuned BERT only"
FROZEN_TEXT = "frozen BERT only (added)"

ZHAO2024 = Preset(
    name="zhao2024",
    title="The four experiments of the multimodal thesis (Zhao 2024), run correctly",
    runs=(
        PresetRun(EXP1, fusion="blip", tokens=True, reference=FROZEN_TEXT),
        PresetRun(EXP2, fusion="hadamard", tokens=True, reference=FROZEN_TEXT),
        PresetRun(EXP3, fusion="hadamard", finetune=True, reference=EXP4, published=PUBLISHED_FINETUNE),
        PresetRun(EXP4, finetune=True, published=PUBLISHED_FINETUNE),
        PresetRun(FROZEN_TEXT, tokens=True, reference=EXP4),
    ),
    reference=EXP4,
    baselines=("random",),
    published=(
        _published("random", ZHAO, 0.500, 0.201, 0.203, 0.267),
        _published(EXP1, ZHAO, 0.494, 0.217, 0.222, 0.285),
        _published(EXP2, ZHAO, 0.505, 0.222, 0.226, 0.289),
        _published(EXP3, ZHAO, 0.638, 0.254, 0.281, 0.343),
        _published(EXP4, ZHAO, 0.689, 0.306, 0.336, 0.400),
    ),
    notes=(
        f"'{FROZEN_TEXT}' is not in the thesis: NRMS over frozen BERT tokens alone, the reference of experiments "
        "1 and 2 (frozen against frozen), itself paired with experiment 4 (frozen against fine-tuned). "
        "Experiment 3 is paired with 4: do images help a fine-tuned model?",
        "Frozen runs attend over the stores' token vectors (PLM + self-attention + additive attention, as in "
        "the thesis); each user attends only over their own history, and images are read as RGB.",
    ),
    thesis=True,
)

PRESETS = {p.name: p for p in (PLM_NR, MTREC, ZHAO2024)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        from storage.errors import PipelineError

        raise PipelineError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def thesis_markdown(report: dict, preset: Preset) -> str:
    """thesis.md: our runs (random first, then the preset's order) in the thesis's table
    format beside the published rows, then the same runs with our intervals."""
    from runs.render import LABELS, METRICS, thesis_table

    by_name = {r["name"]: r for r in report["runs"]}
    order = [b for b in preset.baselines if b in by_name] + [r.label for r in preset.runs if r.label in by_name]
    ours = [by_name[name] for name in order]
    level = f"{round(100 * (report.get('bootstrap') or {}).get('level', 0.95))}%"
    lines = [
        f"# {preset.title}", "",
        f"Dataset: {report['dataset']['name']} ({report['dataset'].get('dev impressions', '?')} dev impressions). "
        "Rows with a source in parentheses are the published numbers (MIND-small with IM-MIND), not runs of "
        "this pipeline.", "",
        thesis_table(ours + list(preset.published)), "",
        f"## Our runs with {level} bootstrap intervals over impressions", "",
        "| experiment | " + " | ".join(LABELS[m] for m in METRICS) + " |",
        "|---|" + "---:|" * len(METRICS),
    ]
    for run in ours:
        cells = []
        for m in METRICS:
            v = run["metrics"][m]
            cells.append(f"{v['value']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]")
        lines.append(f"| {run['name']} | " + " | ".join(cells) + " |")
    paired = report.get("paired") or {}
    refs = report.get("references") or {}
    if paired:
        lines += ["", "## Paired differences (AUC, run minus its reference, same impressions)", ""]
        for run in ours:
            d = paired.get(run["name"], {}).get("auc")
            if d:
                ref = refs.get(run["name"], report["reference"])
                lines.append(f"- {run['name']} vs {ref}: {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]")
    return "\n".join(lines) + "\n"
