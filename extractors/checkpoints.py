"""Finding a checkpoint offline, knowing what it is, and naming the store of its vectors.

`ensure_available(name, checkpoint, pooling)` is the preflight every command runs before any
model code is imported (it reads file names and JSON only, so it answers in well under a
second). It resolves the checkpoint, in this order:
- `tiny`: the seeded random model;
- a local folder (absolute, relative or `~`);
- the local Hugging Face cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
  `~/.cache/huggingface/hub`), by the name transformers or timm would use: `org/name`,
  `hf-hub:org/name`, `timm/name`, an optional `@revision`, and a bare name as the extractor's
  library spells it (`vit:vit_base_patch16_224` finds timm's `timm/vit_base_patch16_224.<tag>`,
  `bert:bert-base-uncased` finds `bert-base-uncased` or `<org>/bert-base-uncased`).
It then detects the checkpoint's format from its files (a transformers `config.json` with a
`model_type`, a timm one with an `architecture`, sentence-transformers' pooling files), and
refuses a wrong format, a missing file or an unsupported architecture with one line naming
what was found and what to pass. The answer is a frozen `Checkpoint`: where the files are,
what they are, how the vectors will be pooled and how wide they will be, and the identity of
the weights.

The identity names the store (`slug_of`): the hub revision of a cached snapshot, or for a
local folder its resolved path and a digest of its files' names, sizes and modification
times. Two checkpoints in folders of the same name, or the same folder after its weights were
replaced, never share a store. Loaders never touch the network: they get the resolved
folder, with `local_files_only=True`, and nothing here sets process-wide state.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from extractors.config import TINY, ExtractorConfig, default_pooling
from extractors.families import (BLIP_RETRIEVAL, BLIP_TYPES, OTHER_MULTIMODAL, OTHER_WEIGHTS, SENTENCEPIECE_FILES,
                                 TEXT_TYPES, VISION_TYPES, ImagePrep, SentencePooling, image_prep, read_json,
                                 sentence_pooling, tokenizer_files, weight_files)
from storage.errors import PipelineError

T = TypeVar("T")

POOLINGS = ("cls", "mean", "model")
"""`cls`: the class token as the model uses it; `mean`: the masked mean of the token vectors;
`model`: the checkpoint's own pooled output (sentence-transformers pooling, SigLIP's head,
CLIP's projection into the joint image-text space, timm's head)."""
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_IGNORED_SUFFIXES = (".md", ".lock", ".incomplete")
MAX_CHECKPOINT_FILES = 10_000


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, read from the environment at each call."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


@dataclass(frozen=True)
class Checkpoint:
    """What `ensure_available` found for `extractor:checkpoint`.

    `path` is the folder the loaders read (absolute; for a sentence-transformers model in an
    older layout, its transformer's subfolder is `model_path`); `source` is tiny, local or hub.
    `revision` is the hub commit of a cached snapshot, or `files-<digest>` of a local folder's
    files. `pooling` is the pooling that will be used (asked for, else the checkpoint's
    default); None only for a timm model whose config does not say how it pools (decided when
    it is built). `width` is the stored vector width when the config says it.
    """

    extractor: str
    checkpoint: str
    source: str
    kind: str
    path: Path | None = None
    repo: str = ""
    revision: str = ""
    format: str = "tiny"
    family: str = "tiny"
    architecture: str = ""
    pooling: str | None = "mean"
    model_pooling: str = ""
    width: int | None = None
    sentence: SentencePooling | None = None
    image: ImagePrep | None = None

    @property
    def is_tiny(self) -> bool:
        return self.source == "tiny"

    @property
    def model_path(self) -> Path | None:
        if self.path is None or self.sentence is None or not self.sentence.model_dir:
            return self.path
        return self.path / self.sentence.model_dir

    @property
    def identity(self) -> str:
        """What the weights are: `tiny`, `hub:org/name@commit` or `dir:/abs/path#files-<digest>`."""
        if self.is_tiny:
            return TINY
        if self.source == "hub":
            return f"hub:{self.repo}@{self.revision}"
        return f"dir:{self.path}#{self.revision}"

    @property
    def slug(self) -> str:
        """The store-name part: `bert-tiny`, or `NAME-<label>-<10 hex of the identity>`."""
        return identity_slug(self.extractor, self.identity)

    def extractor_config(self, modality: str, **fields) -> ExtractorConfig:
        """The extractor config these weights are used with (its pooling, identity and family)."""
        return ExtractorConfig(
            name=self.extractor, checkpoint=self.checkpoint, modality=modality, revision=self.revision or None,
            pooling=self.pooling, weights="" if self.is_tiny else self.identity,
            family="" if self.is_tiny else f"{self.format} {self.family}", model_pooling=self.model_pooling, **fields)


def identity_slug(name: str, identity: str) -> str:
    """`NAME-tiny`, or `NAME-<readable label>-<10 hex of the identity>` for an identity of
    `Checkpoint.identity`'s form: weights of another repository, revision, folder or content
    get another store name."""
    if identity == TINY:
        return f"{name}-{TINY}"
    if identity.startswith("hub:"):
        label = identity.removeprefix("hub:").rpartition("@")[0].replace("/", "-")
    else:
        label = _folder_label(Path(identity.removeprefix("dir:").rpartition("#")[0]))
    digest = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:10]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{name}-{label}-{digest}").strip("-")


def _folder_label(path: Path) -> str:
    """A folder's readable name: a hub snapshot folder is named after its repository."""
    parts = path.parts
    if _HEX40.match(path.name) and len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "-")
    return path.name or "checkpoint"


# ---------------------------------------------------------------- locating


def files_digest(folder: Path) -> str:
    """`files-<sha256>` over the relative names, sizes and modification times of a folder's
    files (hidden entries and READMEs aside): replacing the weights in place changes it."""
    digest = hashlib.sha256(b"mmnews-checkpoint-files-v1\n")
    seen = 0
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        seen += len(files)
        if seen > MAX_CHECKPOINT_FILES:
            raise PipelineError(f"{folder} holds more than {MAX_CHECKPOINT_FILES:,} files, not one checkpoint; pass "
                                "the folder that holds its config.json and weights")
        for name in sorted(files):
            if name.startswith(".") or name.lower().endswith(_IGNORED_SUFFIXES):
                continue
            path = Path(root) / name
            try:
                st = path.stat()
            except OSError:
                continue  # a dangling link: the loader will name it if it matters
            digest.update(f"{path.relative_to(folder)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return "files-" + digest.hexdigest()


def _missing(kind: str, checkpoint: str, where: str, fix: str = "") -> PipelineError:
    fix = fix or ("pass a local folder holding config.json, the weights (model.safetensors) and the tokenizer or "
                  "preprocessor files, a name in the local Hugging Face cache, or the embedded default `tiny`")
    return PipelineError(f"cannot load {kind} checkpoint {checkpoint!r}: {where}. Fix: {fix}.")


def _hub_name(checkpoint: str) -> tuple[str, str | None]:
    """(`org/name` or a bare name, revision or None) from `hf-hub:org/name@rev` and the like."""
    name = checkpoint.removeprefix("hf-hub:")
    name, _, revision = name.partition("@")
    return name.strip("/"), revision or None


def _repo_folder(repo: str) -> str:
    return "models--" + repo.replace("/", "--")


def _cached_repos(cache: Path, bare: str, hub_prefix: str) -> list[str]:
    """Repositories in the cache a bare name may mean, as the extractor's library names them."""
    if not cache.is_dir():
        return []
    if hub_prefix:  # timm: `timm/NAME` exactly, else its pretrained tags `timm/NAME.<tag>`
        org = hub_prefix.rstrip("/")
        exact = f"{org}/{bare}"
        if (cache / _repo_folder(exact)).is_dir():
            return [exact]
        if "." in bare:  # a tagged name is meant exactly
            return []
        start = _repo_folder(exact) + "."
        return sorted(f"{org}/{e.name[len(_repo_folder(org)) + 2:]}" for e in os.scandir(cache)
                      if e.is_dir() and e.name.startswith(start))
    if (cache / _repo_folder(bare)).is_dir():  # transformers: a legacy name without an org ...
        return [bare]
    end = "--" + bare
    return sorted(e.name.removeprefix("models--").replace("--", "/", 1) for e in os.scandir(cache)
                  if e.is_dir() and e.name.startswith("models--") and e.name.endswith(end)
                  and e.name.count("--") == 2)  # ... or the same name under any org (google-bert/...)


def _snapshot(cache: Path, repo: str, revision: str | None, kind: str, checkpoint: str) -> tuple[Path, str]:
    """(snapshot folder, commit) of a cached repository at `revision` (default: refs/main)."""
    root = cache / _repo_folder(repo)
    ref = revision or "main"
    commit = ref if _HEX40.match(ref) else None
    if commit is None and (root / "refs" / ref).is_file():
        commit = (root / "refs" / ref).read_text(encoding="utf-8").strip()
    snapshots = sorted(p.name for p in (root / "snapshots").iterdir()) if (root / "snapshots").is_dir() else []
    if commit is None and revision is None and len(snapshots) == 1:
        commit = snapshots[0]  # no refs/main (copied by hand): its only snapshot
    if commit is None or not (root / "snapshots" / commit).is_dir():
        found = ", ".join(s[:12] for s in snapshots) or "none"
        raise _missing(kind, checkpoint, f"{root} has no snapshot for revision {ref!r} (snapshots: {found})",
                       f"pass `@<commit>` after the name, or the snapshot folder itself, or download it again "
                       f"on a connected machine (`hf download {repo}`)")
    return root / "snapshots" / commit, commit


def locate(kind: str, checkpoint: str, hub_prefix: str = "") -> tuple[Path, str, str, str]:
    """(folder, source `local` or `hub`, repo, commit) of a non-tiny checkpoint; the commit is
    empty for a local folder (its `files_digest` is taken once its files made sense)."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        return path.resolve(), "local", "", ""
    if path.is_file():
        raise _missing(kind, checkpoint, f"{path.resolve()} is a file, not a checkpoint folder",
                       f"pass the folder that holds it ({path.resolve().parent})")
    if checkpoint.startswith(("/", ".", "~")):
        raise _missing(kind, checkpoint, f"the directory {path.resolve()} does not exist")
    name, revision = _hub_name(checkpoint)
    cache = hub_cache()
    if name.count("/") == 1:
        repos = [name] if (cache / _repo_folder(name)).is_dir() else []
    elif "/" in name:
        raise _missing(kind, checkpoint, "not a local folder, and not a hub name (`org/name`)")
    else:
        repos = _cached_repos(cache, name, hub_prefix)
    if len(repos) > 1:
        raise _missing(kind, checkpoint, f"the Hugging Face cache ({cache}) holds several checkpoints of that name: "
                       f"{', '.join(repos)}", f"pass one of them by its full name, e.g. {repos[0]}")
    if not repos:
        repo = name if "/" in name else f"{hub_prefix}{name}"
        raise _missing(
            kind, checkpoint,
            f"it is not a local folder, and the Hugging Face cache ({cache}) has no {_repo_folder(repo)}"
            f"{'*' if hub_prefix and '/' not in name else ''}; this machine cannot download it",
            f"on a connected machine run `hf download {repo}` and copy its cache folder into {cache} (or set "
            "HF_HUB_CACHE to a cache that holds it), pass a local folder, or use `tiny`")
    folder, commit = _snapshot(cache, repos[0], revision, kind, checkpoint)
    return folder, "hub", repos[0], commit


# ---------------------------------------------------------------- what a folder holds


def _config(folder: Path, kind: str, checkpoint: str) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        others = sorted(p.name for p in folder.iterdir())[:8] if folder.is_dir() else []
        hint = ("an OpenCLIP checkpoint (open_clip_config.json), which this project does not load; use its timm or "
                "transformers version" if (folder / "open_clip_config.json").is_file()
                else "pass the folder that holds config.json and the weights")
        raise _missing(kind, checkpoint, f"{folder} has no config.json (it holds: {', '.join(others) or 'nothing'})",
                       hint)
    config = read_json(path)
    if not isinstance(config, dict):
        raise PipelineError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def _need_weights(folder: Path, kind: str, checkpoint: str) -> None:
    if weight_files(folder):
        return
    other = [name for name in OTHER_WEIGHTS if (folder / name).is_file()]
    if other:
        raise _missing(kind, checkpoint, f"{folder} holds only {', '.join(other)}, not PyTorch weights",
                       "convert it or download the model.safetensors (or pytorch_model.bin) of the same checkpoint")
    raise _missing(kind, checkpoint,
                   f"{folder} holds config.json but no weights (model.safetensors or pytorch_model.bin)",
                   "copy the weights of the same checkpoint into that folder (an interrupted download leaves this)")


def _installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is absent
        return False


def _need_tokenizer(folder: Path, kind: str, checkpoint: str) -> None:
    found = tokenizer_files(folder)
    if not found:
        raise _missing(kind, checkpoint, f"{folder} has no tokenizer (tokenizer.json, vocab.txt, vocab.json or a "
                       "SentencePiece model)", "copy the tokenizer files of the same checkpoint into that folder")
    if set(found) <= set(SENTENCEPIECE_FILES):
        absent = [m for m in ("sentencepiece", "google.protobuf") if not _installed(m)]
        if absent:
            raise _missing(kind, checkpoint, f"its only tokenizer is a SentencePiece model ({', '.join(found)}), and "
                           f"transformers reads one only with the sentencepiece and protobuf packages "
                           f"({', '.join(a.removeprefix('google.') for a in absent)} not installed)",
                           "install them (`uv add sentencepiece protobuf`), or add the checkpoint's tokenizer.json "
                           "(saved by `save_pretrained` of its tokenizer on a machine that has them)")


def _what_it_is(config: dict) -> str:
    """`a CLIP checkpoint (model_type clip)`, `a timm checkpoint (vit_base_patch16_224)`..."""
    if "architecture" in config and "model_type" not in config:
        return f"a timm vision checkpoint ({config['architecture']})"
    model_type = str(config.get("model_type", "?"))
    label = {**TEXT_TYPES, **VISION_TYPES, **BLIP_TYPES, **OTHER_MULTIMODAL}.get(model_type, model_type)
    return f"a {label} checkpoint (config.json model_type {model_type!r})"


def _pass_instead(config: dict, checkpoint: str) -> str:
    """What to pass for a checkpoint that another extractor takes."""
    model_type = config.get("model_type")
    if ("architecture" in config and model_type is None) or model_type in VISION_TYPES:
        extra = " (--pooling model for CLIP's joint image-text space)" if model_type == "clip" else ""
        return f"pass vit:{checkpoint} for its image tower{extra}"
    if model_type in TEXT_TYPES:
        return f"pass bert:{checkpoint}"
    if model_type in BLIP_TYPES:
        return f"pass blip:{checkpoint}"
    if config.get("auto_map"):
        return ("it needs custom model code (auto_map in config.json), which this project never runs; use a "
                "version of the model in a standard architecture")
    return (f"bert takes {', '.join(sorted(set(TEXT_TYPES.values())))}; vit takes timm models and "
            f"{', '.join(sorted(set(VISION_TYPES.values())))}; blip takes {BLIP_RETRIEVAL}")


def _int(value) -> int | None:
    return int(value) if isinstance(value, int) and value > 0 else None


def _inspect_text(folder: Path, kind: str, checkpoint: str) -> dict:
    sentence = sentence_pooling(folder)
    model_folder = folder / sentence.model_dir if sentence and sentence.model_dir else folder
    config = _config(model_folder, kind, checkpoint)
    model_type = config.get("model_type")
    if model_type not in TEXT_TYPES:
        raise _missing(kind, checkpoint, f"it is {_what_it_is(config)}, not a text encoder the bert extractor runs",
                       _pass_instead(config, checkpoint))
    _need_weights(model_folder, kind, checkpoint)
    _need_tokenizer(model_folder, kind, checkpoint)
    hidden = _int(config.get("hidden_size")) or _int(config.get("dim"))
    if sentence is None:
        default, model_pooling, pooled = "cls", "", None
    else:  # None: no pooling can be trusted by default when the pipeline has modules we do not run
        default = None if sentence.unsupported else "model"
        model_pooling, pooled = sentence.label, hidden * len(sentence.modes) if hidden else None
    return dict(format="transformers", family=TEXT_TYPES[model_type], architecture=str(model_type), default=default,
                model_pooling=model_pooling, widths={"cls": hidden, "mean": hidden, "model": pooled}, sentence=sentence)


def _inspect_vision(folder: Path, kind: str, checkpoint: str) -> dict:
    config = _config(folder, kind, checkpoint)
    if "architecture" in config and "model_type" not in config:  # timm's hub layout
        _need_weights(folder, kind, checkpoint)
        pool = config.get("global_pool", (config.get("model_args") or {}).get("global_pool"))
        no_class = (config.get("model_args") or {}).get("class_token") is False or pool == "map"
        width = _int(config.get("num_features"))
        default = None if pool is None else ("cls" if pool == "token" and not no_class else "model")
        return dict(format="timm", family="timm", architecture=str(config["architecture"]), default=default,
                    model_pooling=f"timm head ({pool or 'as built'})", widths={"cls": width, "mean": width,
                    "model": width}, no_class=no_class)
    model_type = config.get("model_type")
    if model_type not in VISION_TYPES:
        raise _missing(kind, checkpoint, f"it is {_what_it_is(config)}, not a vision model the vit extractor runs",
                       _pass_instead(config, checkpoint))
    _need_weights(folder, kind, checkpoint)
    prep = image_prep(folder)
    tower = config.get("vision_config") if model_type in ("clip", "siglip") else config
    hidden = _int((tower or {}).get("hidden_size"))
    family = VISION_TYPES[model_type]
    if family == "CLIP":
        return dict(format="transformers", family=family, architecture=str(model_type), default="cls",
                    model_pooling="projection (joint image-text space)", image=prep,
                    widths={"cls": hidden, "mean": hidden, "model": _int(config.get("projection_dim"))})
    if family == "SigLIP":
        return dict(format="transformers", family=family, architecture=str(model_type), default="model",
                    model_pooling="attention-pool head (joint image-text space)", image=prep, no_class=True,
                    widths={"cls": hidden, "mean": hidden, "model": hidden})
    return dict(format="transformers", family=family, architecture=str(model_type), default="cls", image=prep,
                model_pooling="class token", widths={"cls": hidden, "mean": hidden, "model": hidden})


def _inspect_blip(folder: Path, kind: str, checkpoint: str) -> dict:
    config = _config(folder, kind, checkpoint)
    model_type = config.get("model_type")
    if model_type not in BLIP_TYPES:
        raise _missing(kind, checkpoint, f"it is {_what_it_is(config)}, not a BLIP image-text retrieval model",
                       _pass_instead(config, checkpoint))
    architectures = config.get("architectures") or []
    if architectures and BLIP_RETRIEVAL not in architectures:
        raise _missing(kind, checkpoint, f"it is a BLIP {', '.join(map(str, architectures))} checkpoint, which has no "
                       "image-text matching encoder", "pass an image-text retrieval checkpoint such as "
                       "Salesforce/blip-itm-base-coco, blip-itm-large-coco, blip-itm-base-flickr or "
                       "blip-itm-large-flickr")
    _need_weights(folder, kind, checkpoint)
    _need_tokenizer(folder, kind, checkpoint)
    prep = image_prep(folder)
    hidden = _int((config.get("text_config") or {}).get("hidden_size"))
    return dict(format="transformers", family="BLIP", architecture=BLIP_RETRIEVAL, default="cls", image=prep,
                model_pooling="grounded [CLS] (the image-text matching head's input)",
                widths={"cls": hidden, "mean": hidden, "model": hidden})


_INSPECT = {"text": _inspect_text, "image": _inspect_vision, "multimodal": _inspect_blip}


# ---------------------------------------------------------------- the preflight


def ensure_available(name: str, checkpoint: str, pooling: str | None = None) -> Checkpoint:
    """Resolve `name:checkpoint` with `pooling` (None: the checkpoint's default) from files
    alone, or raise a one-line PipelineError naming what was found and what to pass."""
    from extractors.registry import entry

    found = entry(name)
    kind = found.kind
    if pooling is not None and pooling not in POOLINGS:
        raise PipelineError(f"unknown pooling {pooling!r} for {name}:{checkpoint}; known: {', '.join(POOLINGS)}")
    if checkpoint == TINY:
        if pooling == "model":
            raise PipelineError(f"{name}:tiny has no pooling of its own (`model`); pass pooling cls or mean")
        return Checkpoint(found.name, TINY, "tiny", kind, pooling=default_pooling(TINY, pooling))
    folder, source, repo, revision = locate(kind, checkpoint, found.hub_prefix)
    what = _INSPECT[found.modality](folder, kind, checkpoint)
    revision = revision or files_digest(folder)
    chosen = pooling or what["default"]
    label = f"{found.name}:{checkpoint}"
    if chosen is None and what["format"] != "timm":
        raise PipelineError(
            f"{label} is a sentence-transformers model whose pipeline also runs "
            f"{', '.join(what['sentence'].unsupported)}, which this project does not; pass pooling cls or mean to "
            "store the encoder's own token pooling instead")
    if chosen == "model" and found.modality == "text":
        sentence = what["sentence"]
        if sentence is None:
            raise PipelineError(f"{label} has no sentence-transformers pooling (modules.json, 1_Pooling/config.json) "
                                "to follow; pass pooling cls or mean")
        if sentence.unsupported:
            raise PipelineError(f"{label}: its sentence-transformers pipeline also runs "
                                f"{', '.join(sentence.unsupported)}, which this project does not; "
                                "pass pooling cls or mean")
    if chosen == "cls" and what.get("no_class"):
        raise PipelineError(f"{label} ({what['family']} {what['architecture']}) has no class token; pass pooling "
                            f"model (its {what['model_pooling']}) or mean")
    width = what["widths"].get(chosen) if chosen else what["widths"].get("cls")
    return Checkpoint(
        found.name, checkpoint, source, kind, path=folder, repo=repo, revision=revision, format=what["format"],
        family=what["family"], architecture=what["architecture"], pooling=chosen,
        model_pooling=what["model_pooling"], width=width, sentence=what.get("sentence"), image=what.get("image"),
    )


def slug_of(name: str, checkpoint: str) -> str:
    """The store-name part of extractor `name` over `checkpoint` (torch-free): `bert-tiny`, or
    the extractor, the checkpoint's readable name and 10 hex of the weights' identity.

    Extraction (extractors.run) and the lookup of an existing store use this one function."""
    if checkpoint == TINY:
        return f"{name.strip().lower()}-{TINY}"
    from extractors.registry import entry

    found = entry(name)
    folder, source, repo, revision = locate(found.kind, checkpoint, found.hub_prefix)
    return Checkpoint(found.name, checkpoint, source, found.kind, path=folder, repo=repo,
                      revision=revision or files_digest(folder)).slug


def load_or_explain(ckpt: Checkpoint, what: str, loader: Callable[[], T]) -> T:
    """Run `loader()`; any failure becomes a one-line PipelineError stating its real cause."""
    try:
        return loader()
    except PipelineError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever a library raises, the user gets one line, not a traceback
        cause = (str(err).strip().splitlines() or [""])[0][:300]
        fix = (f"download it again on a connected machine (`hf download {ckpt.repo}`)" if ckpt.repo
               else "check that the folder holds one complete checkpoint, copied from a single source")
        raise PipelineError(f"cannot load {ckpt.kind} checkpoint {ckpt.checkpoint!r} ({ckpt.format} {ckpt.family} in "
                            f"{ckpt.path}): {what} failed: {type(err).__name__}: {cause}. Fix: {fix}.") from err
