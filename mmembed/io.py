"""The self-describing model directory (docs/architecture.md §6): the format, written and checked.

Building a model from it is :func:`mmembed.load` (:mod:`mmembed.build`); this module only writes the directory and
reads it back safely (:func:`resolve_model_dir`).

```
mmembed_config.json   format_version, model config (every slot), preprocess, prompts, similarity, versions
model.safetensors     full state dict, keys prefixed by slot (vision., connector., backbone., pooler., ...)
backbone/             the HF config, so the backbone rebuilds with no hub access
tokenizer/            the tokenizer with the image placeholder token
processor/            native VLM backbones (Qwen2-VL, LLaVA): the HF processor (tokenizer + image processor)
README.md             generated model card (Hugging Face front matter, usage, recipe, data, scores, components)
```
Weights are safetensors only; nothing is ever unpickled. The directory is written under a temporary
name and renamed when complete; its folders get mode ``0o777`` and its files ``0o666``, less the process umask
(``drwxr-xr-x`` / ``-rw-r--r--`` under the usual 022), so a model saved on a shared cluster is readable by others.
Format history: 1 had one ``reducer`` slot; 2 has ``merge`` and ``prune``
(:func:`mmembed.config.upgrade_model_dict` converts 1). Within a format, an argument added later with a new default
is pinned to its old value for directories saved without it (:func:`pin_legacy_args`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mmembed.config import iter_keys
from mmembed.registry import component_module, import_module

__all__ = [
    "save_model",
    "resolve_model_dir",
    "read_config",
    "pin_legacy_args",
    "offline",
    "ModelDirError",
    "FORMAT_VERSION",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "library_versions",
]

FORMAT_VERSION = 2
CONFIG_NAME = "mmembed_config.json"
WEIGHTS_NAME = "model.safetensors"
_SLOTS = ("vision", "connector", "merge", "prune", "pooler", "fusion")
_LOCAL_KEYS = ("name", "tokenizer", "processor")  # backbone args that point into the model directory once saved


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("mmembed", "torch", "transformers", "timm", "open_clip_torch", "safetensors", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _export_cfg(model: Any, directory: Path) -> dict[str, Any]:
    cfg = dataclasses.asdict(model.cfg)
    for slot in _SLOTS:
        module = getattr(model, slot)
        if module is not None:
            export = getattr(module, "export_args", None)
            args = export() if export else dict(getattr(module, "init_args", {}))
            cfg[slot] = {"type": module.registry_name, **args}
    cfg["backbone"] = {"type": model.backbone.registry_name, **model.backbone.export(directory)}
    return cfg


def _required_imports(model: Any) -> list[dict[str, str | None]]:
    """The non-mmembed modules that define the model's components, with the distribution that ships each (plugins:
    a ``mmembed.components`` entry point or a recipe's ``imports:``); loading imports them first."""
    from importlib.metadata import packages_distributions

    dists = packages_distributions()
    out = []
    for slot in (*_SLOTS, "backbone"):
        module = component_module(getattr(model, slot, None)) if getattr(model, slot, None) is not None else None
        if module and module not in [r["module"] for r in out]:
            package = (dists.get(module.split(".")[0]) or [None])[0]
            out.append({"module": module, "package": package})
    return out


def _current_umask() -> int:
    """The process umask (``os.umask`` can only be read by setting it, so it is set back at once)."""
    old = os.umask(0)
    os.umask(old)
    return old


def _apply_modes(root: Path, umask: int) -> None:
    """Folders ``0o777`` and files ``0o666`` less ``umask``, for ``root`` and everything under it (links untouched).

    ``tempfile.mkdtemp`` creates the folder ``0o700``; without this a saved model is private to its writer.
    """
    dir_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    os.chmod(root, dir_mode)
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(base, name)
            if not os.path.islink(p):
                os.chmod(p, dir_mode if name in dirs else file_mode)


def save_model(
    model: Any,
    directory: str | os.PathLike,
    card: str | None = None,
    card_info: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` to ``directory`` atomically (temporary folder, then rename).

    Args:
        model: the :class:`~mmembed.model.EmbeddingModel` to write.
        directory: the model directory; an existing one is replaced only once the new one is complete.
        card: the whole ``README.md`` text, replacing the generated model card.
        card_info: what the generated card cannot know from the model itself, all optional: ``recipe`` (the
            recipe path, or a dict of its key settings), ``data`` (the training data: a description, a list of
            dataset names, or ``{name: rows}``), ``scores`` (an eval ``scores.json`` dict, or ``{name: value}``),
            ``license`` (a Hugging Face licence id; ``other`` when not given).
    """
    from safetensors.torch import save_model as st_save

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    umask = _current_umask()
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        model_cfg = _export_cfg(model, tmp)
        transform = model.processor.transform
        meta = {
            "format_version": FORMAT_VERSION,
            "model": model_cfg,
            "preprocess": transform.to_dict() if transform is not None else None,
            "image_tokens": model.processor.image_tokens,
            "embed_dim": model.embed_dim,
            "prompts": dict(model.cfg.prompts),
            "similarity": getattr(model, "similarity_fn_name", None) or ("cosine" if model.cfg.normalize else "dot"),
            "imports": _required_imports(model),
            "versions": library_versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        for key in ("truncate_dim", "matryoshka_dims"):  # only when set: sentence-transformers' truncate_dim
            value = getattr(model, key, None)
            if value:
                meta[key] = int(value) if key == "truncate_dim" else [int(d) for d in value]
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
        # one metadata key: safetensors writes metadata in hash-map order, so two keys would make the bytes of
        # identical models differ (the format version lives in mmembed_config.json)
        st_save(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / "README.md").write_text(card or _model_card(meta, card_info, tmp))
        _apply_modes(tmp, umask)
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            directory.rename(old)
        tmp.rename(directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


class ModelDirError(ValueError):
    """A model directory that cannot be loaded safely: names the file or key and what is expected."""


_TRUST_HINT = (
    "a saved directory never turns on remote code by itself; if you trust its author, opt in with "
    "mmembed.load(DIR, trust_remote_code=True) (CLI: --trust-remote-code)"
)


def resolve_model_dir(directory: Path, trust_remote_code: bool = False) -> tuple[Path, dict[str, Any], Path]:
    """Check a saved directory before anything is built: ``(config path, model config, weights path)``.

    The model config has its backbone paths resolved inside ``directory``. Refuses (:class:`ModelDirError`, naming
    the file and key) a config that is not JSON or has an unknown ``format_version``, a ``trust_remote_code: true``
    the caller did not grant, ``pretrained: true`` or a ``checkpoint_path`` anywhere (weights come from
    ``model.safetensors`` only), and any path that leaves the directory (``..``, absolute, symlinks) or names the
    hub.
    """
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{directory}: not an mmembed model directory (no {CONFIG_NAME})")
    meta = read_config(cfg_path)
    model_dict = dict(meta["model"])
    _check_no_download(model_dict, cfg_path, trust_remote_code)
    _import_plugins(meta.get("imports") or [], cfg_path)
    model_dict = pin_legacy_args(model_dict)
    backbone = dict(model_dict["backbone"])
    for key in _LOCAL_KEYS:
        value = backbone.get(key)
        if value is not None:
            backbone[key] = _inside(directory, value, f"model.backbone.{key}", cfg_path)
    model_dict["backbone"] = backbone
    weights = Path(_inside(directory, WEIGHTS_NAME, WEIGHTS_NAME, cfg_path))
    return cfg_path, model_dict, weights


def pin_legacy_args(model_dict: dict[str, Any]) -> dict[str, Any]:
    """Saved slots keep their behaviour when a component gains an argument whose default differs from what it did
    before: a component lists such arguments with their old values in ``legacy_args``, and a saved slot that lacks
    one (written before it existed; ``export_args`` writes every argument) gets the old value. A copy is returned."""
    from mmembed.registry import ALL

    out = dict(model_dict)
    for slot, node in model_dict.items():
        registry = ALL.get(slot)
        if registry is None or not isinstance(node, dict) or node.get("type") not in registry:
            continue
        legacy = getattr(registry.get(node["type"]), "legacy_args", None) or {}
        if any(k not in node for k in legacy):
            out[slot] = {**legacy, **node}
    return out


def read_config(cfg_path: Path) -> dict[str, Any]:
    """``mmembed_config.json`` parsed and checked: JSON object, a known integer ``format_version``, a model."""
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ModelDirError(f"{cfg_path}: expected a JSON object, got {type(meta).__name__}")
    version = meta.get("format_version")
    # bool is an int subclass: `true` must not pass as version 1
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise ModelDirError(
            f"{cfg_path}: format_version {version!r} is not supported (this mmembed reads the integers "
            f"1..{FORMAT_VERSION})"
        )
    if not isinstance(meta.get("model"), dict) or not isinstance(meta["model"].get("backbone"), dict):
        raise ModelDirError(f"{cfg_path}: 'model' must be an object with a 'backbone' object")
    from mmembed.api import saved_settings_problem  # similarity, truncate_dim, matryoshka_dims (mmembed.load)

    problem = saved_settings_problem(meta)
    if problem:
        raise ModelDirError(f"{cfg_path}: {problem}")
    return meta


def _import_plugins(imports: list[Any], cfg_path: Path) -> None:
    """Import the plugin modules the model was saved with; a missing one is named with the package to install."""
    for req in imports:
        if not isinstance(req, dict) or not isinstance(req.get("module"), str):
            raise ModelDirError(f"{cfg_path}: 'imports' entries must be {{module, package}} objects, got {req!r}")
        try:
            import_module(req["module"], "imports")
        except ImportError as e:
            package = req.get("package") or req["module"].split(".")[0]
            raise ModelDirError(
                f"{cfg_path}: this model uses components from {req['module']!r}, which does not import here; "
                f"install the package that provides it ({package}) or put it on PYTHONPATH ({e})"
            ) from None


def _check_no_download(model_dict: dict[str, Any], cfg_path: Path, trust_remote_code: bool) -> None:
    """Refuse what would run the directory's code or reach the network; the caller alone grants trust."""
    for key, name, value in iter_keys(model_dict, "model"):
        if name == "trust_remote_code" and value and not trust_remote_code:
            raise ModelDirError(f"{cfg_path}: {key} is true: {_TRUST_HINT}")
        if name == "pretrained" and value:
            raise ModelDirError(
                f"{cfg_path}: {key} is {value!r}: a saved model takes its weights from {WEIGHTS_NAME}, never "
                "from a download (expected false)"
            )
        if name == "checkpoint_path" and value:
            raise ModelDirError(f"{cfg_path}: {key} is set: a saved model takes its weights from {WEIGHTS_NAME}")


def _inside(directory: Path, value: Any, key: str, cfg_path: Path) -> str:
    """``value`` as a path inside ``directory`` (symlinks resolved, files below it too); ``tiny`` is built in."""
    if value == "tiny" and key != WEIGHTS_NAME:
        return value
    root = directory.resolve()
    if not isinstance(value, str) or not value or Path(value).is_absolute():
        raise ModelDirError(f"{cfg_path}: {key} must be a relative path inside the model directory, got {value!r}")
    target = (directory / value).resolve()
    if not target.is_relative_to(root) or not target.exists():
        raise ModelDirError(
            f"{cfg_path}: {key} = {value!r} is not a file or folder inside {directory} (a saved model never reads "
            "outside its directory or from the hub)"
        )
    for p in target.rglob("*") if target.is_dir() else ():
        if not p.resolve().is_relative_to(root):
            raise ModelDirError(f"{cfg_path}: {p} (under {key}) points outside the model directory")
    return str(target)


@contextlib.contextmanager
def offline() -> Any:
    """Force the Hugging Face hub offline while a saved model builds (env var and the live constant)."""
    import huggingface_hub.constants as hub_constants

    old_env, old_flag = os.environ.get("HF_HUB_OFFLINE"), hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hub_constants.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = old_flag
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


_CARD_SKIP = {"pretrained", "tokenizer", "processor", "trust_remote_code"}  # never informative in a saved model


def _short(value: Any, limit: int = 60) -> str:
    """A compact one-line rendering of a config value for the card (long values cut with an ellipsis)."""
    text = json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _slot_args(slot: str, node: dict[str, Any], directory: Path | None) -> str:
    """The key arguments of one slot: scalars and short lists; for the backbone, its HF architecture."""
    args = {k: v for k, v in node.items() if k != "type" and k not in _CARD_SKIP and v is not None}
    if slot == "backbone":
        args.pop("name", None)  # a path inside this directory once saved
        hf_cfg = directory / "backbone" / "config.json" if directory is not None else None
        if hf_cfg is not None and hf_cfg.is_file():
            with contextlib.suppress(ValueError, OSError):
                hf = json.loads(hf_cfg.read_text())
                text = hf.get("text_config") if isinstance(hf.get("text_config"), dict) else hf
                for key in ("model_type", "hidden_size", "num_hidden_layers"):
                    value = text.get(key, hf.get(key))
                    if value is not None:
                        args.setdefault(key, value)
    return ", ".join(f"{k}={_short(v)}" for k, v in args.items()) or "-"


def _front_matter(meta: dict[str, Any], info: dict[str, Any]) -> str:
    import yaml

    m = meta["model"]
    tags = ["mmembed", "embeddings", "multimodal" if m.get("vision") else "text"]
    tags += [f"{slot}-{(m.get(slot) or {}).get('type')}" for slot in ("backbone", "vision", "pooler") if m.get(slot)]
    front = {
        "library_name": "mmembed",
        "pipeline_tag": "feature-extraction",
        "tags": tags,
        "license": str(info.get("license") or "other"),
    }
    for key in ("license_name", "license_link", "base_model", "datasets"):
        if info.get(key):
            front[key] = info[key]
    return "---\n" + yaml.safe_dump(front, sort_keys=False, default_flow_style=None, allow_unicode=True) + "---\n"


_SIMILARITY_NOTES = {"dot": "dot product", "euclidean": "negative L2 distance", "manhattan": "negative L1 distance"}


def _usage(meta: dict[str, Any]) -> str:
    """A snippet that runs against this directory: a saved prompt name when there is one."""
    prompts = meta.get("prompts") or {}
    instruction = next(iter(prompts), None) or "Represent the given input."
    if meta["model"].get("vision"):
        call = (
            'emb = model.encode(texts=["a red circle", None], images=[None, "photo.jpg"], '
            f"instruction={json.dumps(instruction)})"
        )
    else:
        call = f'emb = model.encode(texts=["a red circle"], instruction={json.dumps(instruction)})'
    lines = ["```python", "import mmembed", "", 'model = mmembed.load("path/to/this/dir")', call]
    lines.append(
        f"scores = model.similarity(emb, emb)  # {_SIMILARITY_NOTES.get(meta['similarity'], meta['similarity'])}"
    )
    if meta.get("matryoshka_dims"):
        lines.append(f'small = model.encode(texts=["a red circle"], truncate_dim={meta["matryoshka_dims"][-1]})')
    lines.append("```")
    text = "\n".join(lines)
    if prompts:
        names = "\n".join(f"| `{k}` | {v} |" for k, v in prompts.items())
        text += "\n\n`instruction` takes a saved prompt name or any text. Saved prompts:\n\n"
        text += f"| name | text |\n|---|---|\n{names}"
    return text + "\n\nCommand line: `mmembed encode path/to/this/dir --input rows.jsonl --output emb.npy`."


def _data_section(data: Any) -> str:
    if isinstance(data, dict):
        return "\n".join(f"- {k}: {_short(v)}" for k, v in data.items())
    if isinstance(data, (list, tuple)):
        return "\n".join(f"- {_short(d)}" for d in data)
    return str(data)


def _recipe_section(meta: dict[str, Any], info: dict[str, Any], directory: Path | None) -> str:
    m = meta["model"]
    rows = "\n".join(
        f"| {s} | {m[s]['type']} | {_slot_args(s, m[s], directory)} |"
        for s in ("vision", "connector", "merge", "prune", "backbone", "pooler", "fusion")
        if isinstance(m.get(s), dict)
    )
    settings = {k: m.get(k) for k in ("embed_dim", "normalize", "max_length", "layout", "max_images_per_input")}
    text = f"| slot | component | key arguments |\n|---|---|---|\n{rows}\n\n"
    text += ", ".join(f"{k}: {v}" for k, v in settings.items())
    recipe = info.get("recipe")
    if isinstance(recipe, dict):
        text += "\n\nTraining recipe:\n\n" + "\n".join(f"- `{k}`: {_short(v)}" for k, v in recipe.items())
    elif recipe:
        text += f"\n\nTraining recipe: `{recipe}`"
    return text


def _scores_section(scores: dict[str, Any]) -> str:
    """An eval ``scores.json`` (datasets / meta_tasks / overall) or a flat ``{name: value}`` as a table."""

    def num(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    if isinstance(scores.get("datasets"), dict):  # tie-aware hit@1 and the MMEB-official headline (docs/mmeb.md §1.5)
        groups = [(n, d.get("meta_task", "-"), d) for n, d in scores["datasets"].items() if isinstance(d, dict)]
        groups += [
            (f"**{n}** (mean)", n, d) for n, d in (scores.get("meta_tasks") or {}).items() if isinstance(d, dict)
        ]
        rows = [f"| {n} | {m} | {num(d.get('hit@1', '-'))} | {num(d.get('official', '-'))} |" for n, m, d in groups]
        if "overall" in scores:
            rows.append(f"| **overall** | - | {num(scores['overall'])} | {num(scores.get('official_overall', '-'))} |")
        return "| dataset | meta-task | hit@1 | official (MMEB) |\n|---|---|---|---|\n" + "\n".join(rows)
    return "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {num(v)} |" for k, v in scores.items())


def _model_card(meta: dict[str, Any], card_info: dict[str, Any] | None = None, directory: Path | None = None) -> str:
    """README.md of a model directory: HF front matter, usage, recipe, training data, scores, components."""
    info = dict(card_info or {})
    licence = info.get("license")
    parts = [
        _front_matter(meta, info),
        "# mmembed model\n",
        "## Usage\n\n" + _usage(meta) + "\n",
        "## Recipe\n\n" + _recipe_section(meta, info, directory) + "\n",
    ]
    if info.get("data"):
        parts.append("## Training data\n\n" + _data_section(info["data"]) + "\n")
    if isinstance(info.get("scores"), dict) and info["scores"]:
        parts.append("## Evaluation\n\n" + _scores_section(info["scores"]) + "\n")
    if not licence:
        parts.append(
            "## License\n\nNot recorded when this model was saved (`license: other`): the weights derive from the "
            "backbone and vision encoder named above, whose own licences apply.\n"
        )
    details = [f"embedding dimension: {meta['embed_dim']}, similarity: {meta['similarity']}"]
    if meta.get("truncate_dim"):
        details.append(f"encode keeps the first {meta['truncate_dim']} dimensions (`truncate_dim`)")
    if meta.get("matryoshka_dims"):
        dims = ", ".join(map(str, meta["matryoshka_dims"]))
        details.append(f"Matryoshka dimensions trained (`loss.matryoshka_dims`): {dims}; encode with `truncate_dim=`")
    details += [
        f"visual tokens per image: {meta['image_tokens']}",
        f"format_version: {meta['format_version']}, created {meta['created']}",
        f"versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
    ]
    parts.append("## Details\n\n" + "".join(f"- {line}\n" for line in details))
    return "\n".join(parts)
