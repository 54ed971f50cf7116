"""The parameters of every command, validated before any work starts.

One pydantic model per command (`ExtractParams`, `RankParams`, `CompareParams`). Their
validators check the whole plan in about a second and without loading any data or model:
names against the registries (extractors, fusions, rankers), every ranker x fusion x source
combination of the runs a comparison will make, each checkpoint's presence and format
(extractors.checkpoints.ensure_available), and every input folder. The command lines build
them from their options and deployments from their JSON parameters, so a run started with
`prefect deployment run` gets exactly the same checks; the choices that JSON can express
(names, bounds, which fusions a ranker trains on) are also in the models' JSON schema, which
the Prefect server enforces before a run exists.

Names that mean one thing: `seed` is the ranker's seed wherever it appears; the synthetic
world's is `world_seed`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from extractors.registry import available as extractor_names
from extractors.registry import entry as extractor_entry
from extractors.registry import ROLES, extractor_for_role, parse_spec
from rankers.fusion import available as fusion_names
from rankers.fusion import label_of, roles_of
from rankers.registry import baseline_rankers, ranker_entry, ranker_names, trained_rankers
from runs.presets import Preset, get_preset
from storage.errors import PipelineError

Scale = Literal["tiny", "small", "mind-small"]
Device = Literal["auto", "cpu", "cuda"]
FusionName = Literal[tuple(fusion_names())]  # type: ignore[valid-type]
RankerName = Literal[tuple(ranker_names())]  # type: ignore[valid-type]
TrainedRanker = Literal[tuple(trained_rankers())]  # type: ignore[valid-type]
BaselineName = Literal[tuple(baseline_rankers())]  # type: ignore[valid-type]
STORE_MODES = ("frozen", "finetuned")
FINETUNE_ROLES = ("text", "image")
DEFAULT_RANKERS = ("nrms", "lightgbm")
# text-only, the presence control (text + whether there is a cover), image alone, text+image, BLIP
DEFAULT_SOURCES = ("text", "text+cover", "image", "hadamard", "blip")
# The embedded default: the tiny encoders pre-trained on the dataset's own train news (runs.pretrain),
# the analogue of the pre-trained BERT and ViT users bring to real data; `tiny` (random) is for tests.
DEFAULT_EXTRACTORS = ("bert:pretrained", "vit:pretrained", "blip:pretrained")
FROZEN_EPOCHS = 10  # NRMS over stores: at most, with early stopping
FINETUNE_EPOCHS = 3  # as published for NRMS+BERT (and the library's default)


# ----------------------------------------------------------------------------- feature specs


def split_mode(spec: str) -> tuple[str, str]:
    """`bert:CKPT@finetuned` -> (`bert:CKPT`, `finetuned`); no suffix is `frozen`."""
    base, sep, mode = spec.strip().rpartition("@")
    if sep and mode in STORE_MODES:
        return base, mode
    return spec.strip(), "frozen"


def spec_role(spec: str) -> str:
    """The feature role of a `--features` spec (`vit:CKPT@finetuned` -> image)."""
    return extractor_entry(parse_spec(split_mode(spec)[0])[0]).role


def role_specs(features: Iterable[str], fusion: str) -> dict[str, str]:
    """The `--features` spec of every extractor role fusion `fusion` needs (its `cover` flag
    comes from the catalogue, not a store), or a PipelineError naming the extractors to add."""
    from rankers.fusion import COVER

    needed = [r for r in roles_of(fusion) if r != COVER]
    by_role = {spec_role(f): f for f in features}
    missing = [r for r in needed if r not in by_role]
    if missing:
        raise PipelineError(f"--fusion {fusion} needs features for {', '.join(missing)}; add "
                            + ", ".join(extractor_for_role(r) for r in missing) + " to --features")
    return {role: by_role[role] for role in needed}


def reads_images(specs: Iterable[str]) -> bool:
    """Whether any of these feature specs is an extractor that reads cover images."""
    return any(extractor_entry(parse_spec(split_mode(s)[0])[0]).modality != "text" for s in specs)


def is_tiny(spec: str) -> bool:
    return parse_spec(split_mode(spec)[0])[1] == "tiny"


# ----------------------------------------------------------------------------- shared checks


def _as_value_error(check: Callable[[], Any]) -> Any:
    """Run a check that raises PipelineError inside a validator, as pydantic expects."""
    try:
        return check()
    except PipelineError as err:
        raise ValueError(str(err)) from None


def check_checkpoint(spec: str, pooling: str | None = None) -> None:
    """A frozen spec's checkpoint is `tiny`, a local folder or cached, in a format its
    extractor reads, and takes `pooling` (extractors.checkpoints.ensure_available: files and
    JSON only, no model is loaded)."""
    from extractors.checkpoints import ensure_available
    from extractors.registry import PRETRAINED

    name, checkpoint = parse_spec(split_mode(spec)[0])
    if checkpoint == PRETRAINED:  # made (or found) in the storage root when the run starts
        from runs.pretrain import check_pretrainable

        _as_value_error(lambda: check_pretrainable(name))
        return
    _as_value_error(lambda: ensure_available(name, checkpoint, pooling=pooling))


def check_inputs(data: Path | None, images: Path | None, titles: Path | None, splits: tuple[str, ...]) -> None:
    """The data folder holds the splits' files; the images folder and titles file exist."""
    if data is not None:
        if not data.is_dir():
            raise ValueError(f"data folder {data} does not exist; pass --data with a MIND folder (train/ dev/ with "
                             "news.tsv and behaviors.tsv), or leave it out to use the synthetic world")
        missing = [f"{s}/{f}" for s in splits for f in ("news.tsv", "behaviors.tsv") if not (data / s / f).is_file()]
        if missing:
            raise ValueError(f"data folder {data} lacks {', '.join(missing)}; pass the MIND folder that holds "
                             f"{'/ '.join(splits)}/ (e.g. the unpacked MINDsmall_train and MINDsmall_dev as "
                             "train/ and dev/)")
    if images is not None and not images.is_dir():
        raise ValueError(f"image folder {images} does not exist; pass --images with the IM-MIND folder of "
                         "<news_id>.jpg files")
    if titles is not None and not titles.is_file():
        raise ValueError(f"titles file {titles} does not exist; pass --titles with a news_id<TAB>title file")


def _ranker_fusion_schema(ranker_field: str, fusion_field: str, many: bool, default: Iterable[str]) -> list[dict]:
    """JSON-schema rules, from the registries, that a ranker only gets the fusions it trains
    on (`default`: the rankers when the field is left out): what the Prefect server checks
    before it creates a deployment's run."""

    def only(allowed: list[str]) -> dict:
        return {"properties": {fusion_field: {"type": "array", "items": {"enum": allowed}} if many
                               else {"enum": allowed}}}

    rules = []
    for name in trained_rankers():
        allowed = ranker_entry(name).supported_fusions()
        if allowed == fusion_names():
            continue
        chosen = {"contains": {"const": name}} if many else {"const": name}
        rules.append({"if": {"properties": {ranker_field: chosen}, "required": [ranker_field]}, "then": only(allowed)})
    by_default = [f for f in fusion_names() if all(ranker_entry(r).supports(f) for r in default)]
    if by_default != fusion_names():
        rules.append({"if": {"not": {"required": [ranker_field]}}, "then": only(by_default)})
    return rules


class _Params(BaseModel):
    """What every command's parameters share: a name no command knows is refused (a misspelt or
    outdated deployment parameter is an error, not silently dropped), and the storage root
    (--storage or MMNEWS_STORAGE) is checked with the rest, before any server starts."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _storage_root(self):
        from storage.paths import check_storage_root

        _as_value_error(lambda: check_storage_root(getattr(self, "storage", None)))
        return self


# ----------------------------------------------------------------------------- extract


class ExtractParams(_Params):
    """`python -m flows.extract`: frozen features of every news into HDF5 stores."""

    data: Path | None = None
    images: Path | None = None
    titles: Path | None = None
    extractors: list[str] = Field(default_factory=lambda: list(DEFAULT_EXTRACTORS), min_length=1)
    device: Device = "auto"
    batch_size: int = Field(64, ge=1, le=8192)
    workers: int | None = Field(None, ge=0, le=64)  # None: extractors.run.default_workers(device)
    crop: Literal["card", "cover"] = "card"
    missing: Literal["card", "blank", "zeros"] = "card"
    pooling: Literal["cls", "mean", "model"] | None = None  # None: each checkpoint's own
    tokens: bool = True
    dtype: Literal["float16", "float32"] = "float16"
    chunk_rows: int = Field(1024, ge=1, le=1_000_000)
    shards: int = Field(1, ge=1, le=256)
    scheduler: str | None = None
    storage: Path | None = None
    scale: Scale = "small"
    world_seed: int = Field(0, ge=0)
    allow_no_images: bool = False
    progress: bool = True

    @field_validator("extractors")
    @classmethod
    def _known(cls, specs: list[str], info: ValidationInfo) -> list[str]:
        for spec in specs:
            if "@" in spec:
                raise ValueError(f"{spec!r}: extraction writes frozen stores; drop the @ suffix")
            name, _ = _as_value_error(lambda: parse_spec(spec))
            if name not in extractor_names():
                raise ValueError(f"unknown extractor {name!r}; known: {', '.join(extractor_names())}")
        return specs

    @field_validator("scheduler")
    @classmethod
    def _address(cls, address: str | None) -> str | None:
        if address is not None and not address.strip():
            raise ValueError("an empty scheduler address; give tcp://HOST:PORT, or leave it out for a local cluster")
        return address

    @model_validator(mode="after")
    def _plan(self) -> ExtractParams:
        for spec in self.extractors:
            check_checkpoint(spec, self.pooling)
        check_inputs(self.data, self.images, self.titles, splits=())
        if self.data is not None and not any((self.data / s / "news.tsv").is_file() for s in ("train", "dev", "test")) \
                and not (self.data / "news.tsv").is_file():
            raise ValueError(f"data folder {self.data} holds no news.tsv (looked in train/, dev/, test/ and the "
                             "folder itself); pass the MIND folder")
        if self.scheduler is not None and self.shards < 2:
            raise ValueError("--scheduler needs --shards 2 or more (the shards are what the cluster's workers run)")
        if self.device == "cuda":
            _as_value_error(lambda: _require_cuda())
        return self


class PretrainParams(_Params):
    """`python -m flows.pretrain`: the tiny encoders pre-trained on the dataset's train news."""

    data: Path | None = None
    images: Path | None = None
    extractors: list[Literal["bert", "vit", "blip"]] = Field(default_factory=lambda: ["bert", "vit", "blip"],
                                                           min_length=1)
    jobs: int | None = Field(None, ge=1, le=64)  # None: one per core
    storage: Path | None = None
    scale: Scale = "small"
    world_seed: int = Field(0, ge=0)
    progress: bool = True

    @model_validator(mode="after")
    def _plan(self) -> PretrainParams:
        from runs.pretrain import check_pretrainable

        for name in self.extractors:
            _as_value_error(lambda: check_pretrainable(name))
        check_inputs(self.data, self.images, None, splits=())
        if self.data is not None and not (self.data / "train" / "news.tsv").is_file() \
                and not (self.data / "news.tsv").is_file():
            raise ValueError(f"data folder {self.data} holds no train/news.tsv; pre-training reads the train "
                             "split's news: pass the MIND folder")
        return self


def _require_cuda() -> None:
    from extractors.run import resolve_device

    resolve_device("cuda")


# ----------------------------------------------------------------------------- rank


def _needs(flag: str, info: ValidationInfo, on: str, why: str) -> None:
    if not info.data.get(on):
        raise ValueError(f"{flag} needs --{on.replace('_', '-')} ({why})")


class RankParams(_Params):
    """`python -m flows.rank`: train one ranker, evaluate it on dev, write it all."""

    model_config = ConfigDict(json_schema_extra={"allOf": _ranker_fusion_schema("ranker", "fusion", many=False,
                                                                                default=["nrms"])})

    data: Path | None = None
    images: Path | None = None
    titles: Path | None = None
    features: list[str] = Field(default_factory=lambda: [DEFAULT_EXTRACTORS[0]], min_length=1)
    fusion: FusionName = "text"
    ranker: RankerName = "nrms"
    device: Device = "auto"
    epochs: int = Field(FROZEN_EPOCHS, ge=1, le=100)  # left out or None: FINETUNE_EPOCHS with finetune
    lr: float | None = Field(None, gt=0, le=1)
    dropout: float | None = Field(None, ge=0, lt=1)
    tokens: bool = False
    seed: int = Field(0, ge=0)
    threads: int | None = Field(None, ge=1, le=1024)  # None: LightGBM on every core, NRMS on one (CPU)
    storage: Path | None = None
    scale: Scale = "small"
    world_seed: int = Field(0, ge=0)
    run_name: str | None = None
    score_test: bool = True
    allow_no_images: bool = False
    progress: bool = True
    finetune: bool = False
    mtrec: bool = False
    category: bool = True
    ner: bool = True
    surgery: bool = True
    freeze_layers: int = Field(0, ge=0, le=1000)
    grad_checkpointing: bool = False
    accumulate: int | None = Field(None, ge=1, le=1024)
    encoder_lr: float | None = Field(None, gt=0, le=1)
    # LightGBM (None: LGBMConfig's defaults)
    lgbm_trees: int | None = Field(None, ge=1, le=100_000)
    lgbm_learning_rate: float | None = Field(None, gt=0, le=1)
    lgbm_neg_fraction: float | None = Field(None, gt=0, le=1)
    lgbm_max_rows: int | None = Field(None, ge=2)
    lgbm_bagging: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _default_epochs(cls, values):
        if isinstance(values, dict) and values.get("epochs") is None:
            values = {**values, "epochs": FINETUNE_EPOCHS if values.get("finetune") else FROZEN_EPOCHS}
        return values

    @field_validator("features")
    @classmethod
    def _known(cls, specs: list[str]) -> list[str]:
        out = []
        for spec in specs:
            for part in spec.split(","):
                base, _ = split_mode(part)
                name, _ = _as_value_error(lambda: parse_spec(base))
                if name not in extractor_names():
                    raise ValueError(f"unknown extractor {name!r}; known: {', '.join(extractor_names())} "
                                     "(NAME[:CHECKPOINT][@finetuned])")
                out.append(part.strip())
        return out

    @field_validator("finetune")
    @classmethod
    def _finetune(cls, on: bool, info: ValidationInfo) -> bool:
        if not on:
            return on
        ranker, fusion = info.data.get("ranker", "nrms"), info.data.get("fusion", "text")
        if ranker != "nrms":
            raise ValueError(f"fine-tuning trains the nrms ranker (PLM-NR), not {ranker}; drop --ranker, or "
                             "train LightGBM on the fine-tuned store with --features bert@finetuned")
        if not set(roles_of(fusion)) <= set(FINETUNE_ROLES):
            raise ValueError(f"fine-tuning trains bert and vit; --fusion {fusion} is not one of "
                             + ", ".join(f for f in fusion_names() if set(roles_of(f)) <= set(FINETUNE_ROLES)))
        if any(split_mode(f)[1] != "frozen" for f in info.data.get("features", [])):
            raise ValueError("fine-tuning reads raw news, not stores; drop the @finetuned suffix from --features")
        if info.data.get("tokens"):
            raise ValueError("--tokens is for stored features; fine-tuning always attends over the token vectors")
        return on

    @field_validator("mtrec")
    @classmethod
    def _mtrec(cls, on: bool, info: ValidationInfo) -> bool:
        if on:
            _needs("--mtrec", info, "finetune", "MTRec's tasks train the text encoder")
            if "text" not in roles_of(info.data.get("fusion", "text")):
                raise ValueError("MTRec's tasks need the text role; use a --fusion with text")
        return on

    @field_validator("category", "ner", "surgery")
    @classmethod
    def _ablation(cls, on: bool, info: ValidationInfo) -> bool:
        if not on:
            _needs(f"--no-{info.field_name}", info, "mtrec", "it drops one part of MTRec")
            if info.field_name == "ner" and not info.data.get("category", True):
                raise ValueError("--no-category with --no-ner leaves no MTRec task: that is the plain fine-tuned "
                                 "model, drop --mtrec")
        return on

    @field_validator("freeze_layers", "grad_checkpointing", "accumulate", "encoder_lr")
    @classmethod
    def _finetune_only(cls, value, info: ValidationInfo):
        if value not in (None, 0, False):
            _needs(f"--{info.field_name.replace('_', '-')}", info, "finetune", "it is a fine-tuning option")
        return value

    @field_validator("lgbm_trees", "lgbm_learning_rate", "lgbm_neg_fraction", "lgbm_max_rows", "lgbm_bagging")
    @classmethod
    def _lightgbm_only(cls, value, info: ValidationInfo):
        if value is not None and info.data.get("ranker") != "lightgbm":
            raise ValueError(f"--{info.field_name.replace('_', '-')} is a LightGBM option; add --ranker lightgbm")
        return value

    @property
    def lightgbm_options(self) -> dict:
        """The LGBMConfig fields this run sets (the rest keep LGBMConfig's defaults)."""
        fields = {"lgbm_trees": "n_estimators", "lgbm_learning_rate": "learning_rate",
                  "lgbm_neg_fraction": "neg_fraction", "lgbm_max_rows": "max_rows", "lgbm_bagging": "bagging_fraction"}
        return {name: getattr(self, key) for key, name in fields.items() if getattr(self, key) is not None}

    @field_validator("run_name")
    @classmethod
    def _run_name(cls, name: str | None) -> str | None:
        if name is not None:
            _check_name("--run-name", name)
        return name

    @model_validator(mode="after")
    def _plan(self) -> RankParams:
        entry = ranker_entry(self.ranker)
        if entry.reads_features and not entry.supports(self.fusion):
            raise ValueError(f"--ranker {self.ranker} cannot train on --fusion {self.fusion}; it trains on "
                             f"{', '.join(entry.supported_fusions())}")
        if entry.reads_features:
            specs = _as_value_error(lambda: role_specs(self.features, self.fusion))
            for spec in specs.values():
                check_checkpoint(spec)
        check_inputs(self.data, self.images, self.titles, splits=("train", "dev"))
        if self.device == "cuda":
            _as_value_error(lambda: _require_cuda())
        return self

    @property
    def extractor_specs(self) -> list[str]:
        """The extractors this run reads (frozen, fine-tuned or to fine-tune), without their @mode."""
        if self.finetune:
            return list(role_specs(self.features, self.fusion).values())
        return [split_mode(spec)[0] for spec in self.stores.values()]

    @property
    def stores(self) -> dict[str, str]:
        """Role -> feature spec of a ranker over stores (empty for baselines and fine-tuning)."""
        if self.finetune or not ranker_entry(self.ranker).reads_features:
            return {}
        return role_specs(self.features, self.fusion)


def _check_name(option: str, name: str) -> None:
    """A name that becomes a folder under the storage root: one safe path component
    (storage.paths.check_name, whose error is a ValueError and names the option)."""
    from storage.paths import check_name

    check_name(name, option)


# ----------------------------------------------------------------------------- compare


class CompareParams(_Params):
    """`python -m flows.compare`: every ranker x source plus baselines on the same dev impressions."""

    model_config = ConfigDict(json_schema_extra={"allOf": _ranker_fusion_schema("rankers", "sources", many=True,
                                                                                default=DEFAULT_RANKERS)})

    data: Path | None = None
    images: Path | None = None
    titles: Path | None = None
    preset: Literal["plm-nr", "mtrec", "zhao2024"] | None = None
    text: str = DEFAULT_EXTRACTORS[0]
    image: str = DEFAULT_EXTRACTORS[1]
    blip: str = DEFAULT_EXTRACTORS[2]
    distil: str | None = None  # plm-nr's DistilBERT, e.g. bert:distilbert-base-uncased
    rankers: list[TrainedRanker] = Field(default_factory=lambda: list(DEFAULT_RANKERS), min_length=1)
    sources: list[FusionName] = Field(default_factory=lambda: list(DEFAULT_SOURCES), min_length=1)
    # None: random, popularity and oracle, or the preset's own
    baselines: list[BaselineName] | None = None
    device: Device = "auto"
    epochs: int = Field(FROZEN_EPOCHS, ge=1, le=100)
    finetune_epochs: int | None = Field(None, ge=1, le=100)  # None: 3, as published
    tokens: bool = False
    seed: int = Field(0, ge=0)
    seeds: int = Field(1, ge=1, le=50)  # every trained run with seeds seed, seed+1, ...
    lgbm_trees: int | None = Field(None, ge=1, le=100_000)
    lgbm_learning_rate: float | None = Field(None, gt=0, le=1)
    lgbm_neg_fraction: float | None = Field(None, gt=0, le=1)
    lgbm_max_rows: int | None = Field(None, ge=2)
    lgbm_bagging: float | None = Field(None, gt=0, le=1)
    jobs: int | None = Field(None, ge=1, le=64)  # None: default_jobs
    n_boot: int = Field(1000, ge=100, le=100_000)
    score_test: bool = False
    allow_no_images: bool = False
    storage: Path | None = None
    scale: Scale = "small"
    world_seed: int = Field(0, ge=0)
    name: str | None = None
    progress: bool = True

    @field_validator("text", "image", "blip", "distil")
    @classmethod
    def _role(cls, spec: str | None, info) -> str | None:
        if spec is None:
            return spec
        role = {"distil": "text"}.get(info.field_name, info.field_name)
        name, _ = _as_value_error(lambda: parse_spec(split_mode(spec)[0]))
        if name not in extractor_names():
            raise ValueError(f"unknown extractor {name!r}; known: {', '.join(extractor_names())}")
        if extractor_entry(name).role != role:
            raise ValueError(f"{spec!r} is a {extractor_entry(name).role} extractor; --{info.field_name} takes a "
                             f"{role} one, e.g. {extractor_for_role(role)}:CKPT")
        return spec

    @field_validator("name")
    @classmethod
    def _name(cls, name: str | None) -> str | None:
        if name is not None:
            _check_name("--name", name)
        return name

    @model_validator(mode="after")
    def _plan(self) -> CompareParams:
        given = self.model_fields_set
        if self.preset and ({"rankers", "sources"} & given):
            raise ValueError(f"--preset {self.preset} defines its own runs; drop --rankers and --sources")
        if self.distil is not None and self.preset != "plm-nr":
            raise ValueError("--distil is the DistilBERT of --preset plm-nr; drop it, or add --preset plm-nr")
        check_inputs(self.data, self.images, self.titles, splits=("train", "dev"))
        _as_value_error(lambda: plan(self, self.data))  # every run's RankParams: a bad combination fails here
        return self


def validated(model: type[BaseModel], values: dict, options: dict[str, str] | None = None) -> BaseModel:
    """Build a params model; a validation error becomes one readable line per problem.
    `options` maps field names to their command-line option where the two differ."""
    options = options or {}
    try:
        return model(**values)
    except ValidationError as err:
        raise PipelineError(f"invalid options: {describe(err, options)}") from None


def describe(err: ValidationError, options: dict[str, str] | None = None) -> str:
    """A ValidationError as `--option: problem; ...` (the whole-plan checks without an option)."""
    options = options or {}

    def one(e: dict) -> str:
        msg = e["msg"].removeprefix("Value error, ")
        loc = [str(p) for p in e["loc"] if not isinstance(p, int)]
        if e["type"] == "extra_forbidden":
            return f"{'.'.join(loc)!r} is not a parameter of this command (a misspelling, or one it no longer takes)"
        if not loc or isinstance((e.get("ctx") or {}).get("error"), PipelineError):
            return msg  # the whole plan's checks, or a message that names its option itself
        return "--" + options.get(loc[0], loc[0]).replace("_", "-") + f": {msg}"

    return "; ".join(one(e) for e in err.errors())


# ----------------------------------------------------------------------------- the comparison's plan
# What CompareParams' validator builds (every run's RankParams), so it lives here; runs.compare
# scores and reports the runs.


DEFAULT_BASELINES = ("random", "popularity", "oracle")
LIGHTGBM_OPTIONS = ("lgbm_trees", "lgbm_learning_rate", "lgbm_neg_fraction", "lgbm_max_rows", "lgbm_bagging")
CONTROL = "text+cover"
"""The presence control: text plus only whether the news has a cover (rankers.fusion)."""
ENHANCED = " · enhanced titles"


@dataclass
class PlannedRun:
    """One run of a comparison: its label, its ranking parameters (of its first seed), the
    label of the run it is paired with in the report (None: the main reference), whether it
    is a baseline, and the training seeds it is run with (baselines: one)."""

    label: str
    params: RankParams
    reference: str | None = None
    baseline: bool = False
    seeds: tuple[int, ...] = (0,)

    def replicas(self) -> list[tuple[str, RankParams]]:
        """(task label, parameters) of every seed of this run."""
        if len(self.seeds) == 1:
            return [(self.label, self.params.model_copy(update={"seed": self.seeds[0]}))]
        return [(f"{self.label} · seed {s}", self.params.model_copy(update={"seed": s})) for s in self.seeds]


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_jobs(params: CompareParams) -> int:
    """Ranking runs at once: every core on a CPU, each run single-threaded (the runs are small
    and independent, so the comparison's wall time falls with the cores); one on a GPU."""
    if params.jobs is not None:
        return params.jobs
    return 1 if params.device == "cuda" else cores()


def thread_share(params: CompareParams) -> int:
    """Threads each run may use when `default_jobs` runs share the cores."""
    return max(1, cores() // default_jobs(params))


def run_label(ranker: str, source: str | None) -> str:
    return ranker if source is None else f"{ranker} · {label_of(source)}"


def baselines_of(params: CompareParams) -> list[str]:
    if params.baselines is not None:
        return list(params.baselines)
    return list(get_preset(params.preset).baselines if params.preset else DEFAULT_BASELINES)


def all_tiny(specs: Sequence[str]) -> bool:
    """Whether every one of these extractor specs is an embedded tiny model."""
    return all(is_tiny(s) for s in specs)


def _rank_params(label: str, **values) -> RankParams:
    try:
        return RankParams(**values)
    except ValidationError as err:
        raise PipelineError(f"run '{label}': {describe(err)}") from None


def plan(params: CompareParams, data: Path | None) -> list[PlannedRun]:
    """Every run of the comparison, validated (see the module docstring)."""
    runs = _preset_runs(params, data, get_preset(params.preset)) if params.preset else _grid_runs(params, data)
    for baseline in baselines_of(params):
        if baseline == "oracle" and data is not None and not (data / "dev" / "click_probs.txt").is_file():
            continue  # real MIND has no known click probabilities
        runs.append(PlannedRun(baseline, _rank_params(
            baseline, data=data, images=params.images, ranker=baseline, seed=params.seed, storage=params.storage,
            scale=params.scale, world_seed=params.world_seed, score_test=params.score_test,
            allow_no_images=params.allow_no_images, progress=params.progress), baseline=True))
    if params.titles is not None:
        twins = [PlannedRun(run.label + ENHANCED, run.params.model_copy(update={"titles": params.titles}), run.label)
                 for run in runs if not run.baseline and set(roles_of(run.params.fusion)) & {"text", "blip"}]
        runs += twins
    seeds = tuple(range(params.seed, params.seed + params.seeds))
    for run in runs:
        run.seeds = (params.seed,) if run.baseline else seeds
    return runs


def _role_specs(params: CompareParams) -> dict[str, str]:
    """Role -> the extractor spec the comparison gives it (--text, --image, --blip)."""
    return {role: getattr(params, role) for role in ROLES}


def grid_reference(source: str, sources: Sequence[str]) -> str | None:
    """The source a grid run is paired with: a fusion of text with the image's content
    (hadamard, concat, gated) with `text+cover` when that runs (does the content help beyond
    knowing there is a cover?), `text+cover` and the rest with `text` (None: `text` itself, or
    no text run)."""
    if source == "text" or "text" not in sources:
        return None
    roles = set(roles_of(source))
    if CONTROL in sources and source != CONTROL and {"text", "image"} <= roles:
        return CONTROL
    return "text"


def _grid_runs(params: CompareParams, data: Path | None) -> list[PlannedRun]:
    specs = _role_specs(params)
    order = sorted(params.sources, key=lambda s: (s != "text", s != CONTROL))
    runs = []
    for ranker in params.rankers:
        for source in order:
            label = run_label(ranker, source)
            reference = grid_reference(source, params.sources)
            lightgbm = {k: getattr(params, k) for k in LIGHTGBM_OPTIONS} if ranker == "lightgbm" else {}
            runs.append(PlannedRun(label, _rank_params(
                label, **lightgbm, data=data, images=params.images, features=[specs[r] for r in roles_of(source) if r in specs],
                fusion=source, ranker=ranker, device=params.device, epochs=params.epochs, tokens=params.tokens,
                seed=params.seed, threads=thread_share(params), storage=params.storage, scale=params.scale, world_seed=params.world_seed,
                score_test=params.score_test, allow_no_images=params.allow_no_images, progress=params.progress,
            ), run_label(ranker, reference) if reference else None))
    return runs


def _preset_runs(params: CompareParams, data: Path | None, preset: Preset) -> list[PlannedRun]:
    """The preset's runs as ranking parameters; a run whose text spec was not given
    (plm-nr's DistilBERT without --distil) is left out."""
    specs = _role_specs(params)
    runs = []
    for run in preset.runs:
        text = params.distil if run.text == "distil" else params.text
        if text is None:
            continue
        role_spec = {**specs, "text": text}
        options = dict(data=data, images=params.images,
                       features=[role_spec[r] for r in roles_of(run.fusion) if r in role_spec],
                       fusion=run.fusion, ranker="nrms", device=params.device, seed=params.seed,
                       storage=params.storage, scale=params.scale, world_seed=params.world_seed,
                       score_test=params.score_test, allow_no_images=params.allow_no_images,
                       progress=params.progress)
        if run.finetune:
            # Tiny checkpoints train at the tiny scale; real ones as published.
            options.update(finetune=True, **({} if all_tiny(options["features"]) else run.published))
            if params.finetune_epochs is not None:
                options["epochs"] = params.finetune_epochs
            if run.mtrec is not None:
                options.update(mtrec=True, **run.mtrec)
        else:
            options.update(epochs=params.epochs, tokens=run.tokens or params.tokens)
        runs.append(PlannedRun(run.label, _rank_params(run.label, **options), run.reference or
                               (None if run.label == preset.reference else preset.reference)))
    return runs
