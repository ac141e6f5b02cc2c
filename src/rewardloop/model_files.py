"""Where a model comes from: a local directory, checked before transformers sees it so that a
user's mistake is one clear ``UserError``, or a hub id (which transformers downloads unless
``HF_HUB_OFFLINE=1``). Weights are read from safetensors only: a pickle can run code.

safetensors and huggingface_hub are imported inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from rewardloop.errors import UserError

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _is_local(path: str | Path) -> bool:
    text = str(path)
    return (Path(text).exists() or text.startswith((".", "/", "~")) or os.sep in text
            and not _HUB_ID.match(text))


def check_model_dir(path: str | Path) -> str:
    """Validate a local model directory (or pass a hub id through); return what to load: the
    directory's absolute path, so a config or adapter saved from the model names its base
    wherever it is read (a relative one would be read against another working directory, or
    taken for a hub id).

    Refuses: a missing directory; one without ``config.json`` (or ``adapter_config.json``); one
    whose weights are only pickles (a LoRA adapter's must be ``adapter_model.safetensors``); a
    corrupt safetensors file.
    """
    text = str(path)
    if not _is_local(text):
        return _check_hub_id(text)
    p = Path(text).expanduser()
    if not p.exists():
        raise UserError(f"model directory {p} does not exist")
    if not p.is_dir():
        raise UserError(f"{p} is a file; give the model directory (with config.json)")
    if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        if (p / "model" / "config.json").is_file() or (p / "model" / "adapter_config.json"
                                                       ).is_file():
            raise UserError(f"{p} is a run directory; its model is {p / 'model'}")
        raise UserError(f"{p} has no config.json: not a Hugging Face model directory "
                        "(save it with save_pretrained, or build one with `rewardloop tiny`)")
    weights = sorted(p.glob("*.safetensors"))
    if is_adapter_dir(str(p)) and not (p / ADAPTER_WEIGHTS).is_file():
        # peft would read adapter_model.bin (a pickle) when the safetensors file is missing.
        raise UserError(f"{p} is a LoRA adapter without {ADAPTER_WEIGHTS}; rewardloop reads "
                        "safetensors only (re-save it with save_pretrained(dir, "
                        "safe_serialization=True))")
    if not weights:
        pickles = sorted(f.name for f in p.iterdir() if f.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise UserError(
                f"{p} has only pickle weights ({', '.join(pickles)}); loading them can run "
                "arbitrary code, so rewardloop reads safetensors only. Convert once in a trusted "
                "environment: AutoModel.from_pretrained(dir).save_pretrained(dir, "
                "safe_serialization=True)")
        raise UserError(f"{p} has no *.safetensors weights file")
    for file in weights:
        _check_safetensors(file)
    return str(p.resolve())


def _check_hub_id(text: str) -> str:
    """A name that is no local path, as a hub id to load (refused when it cannot be one)."""
    if not _HUB_ID.match(text):
        raise UserError(f"{text!r} is neither a local directory nor a hub id (org/name)")
    if hub_offline() and not _in_hub_cache(text):
        raise UserError(f"{text!r} is not a local directory, and HF_HUB_OFFLINE is set but "
                        "it is not in the Hugging Face cache; download it first or give a "
                        "local directory")
    if "/" not in text and not hub_offline():
        # Said first: a mistyped directory name (hub ids are mostly org/name) would wait on
        # the network's retries before its error.
        log.warning("%r is not a local directory: trying it as a Hugging Face Hub id "
                    "(offline, this retries for about a minute; HF_HUB_OFFLINE=1 makes it "
                    "fail at once)", text)
    return text


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache  # heavy

    return any(isinstance(try_to_load_from_cache(repo_id, name), str)
               for name in ("config.json", "adapter_config.json"))


def _check_safetensors(file: Path) -> None:
    from safetensors import safe_open  # heavy

    try:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                handle.get_slice(key)
    except Exception as exc:  # safetensors raises its own error type and OSError/ValueError
        raise UserError(f"{file} is not a valid safetensors file ({exc}); re-save the model") \
            from None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def hub_errors(source: str) -> Iterator[None]:
    """Turn transformers' OSError for an unreachable/unknown hub id into a UserError, and its
    ValueError for a model that needs its own code or that this transformers does not know."""
    try:
        yield
    except (ValueError, KeyError) as exc:
        text = str(exc)
        if "trust_remote_code" in text:
            raise UserError(f"{source} ships its own model or tokenizer code, which is not run "
                            "unless you trust it: the train commands take --trust-remote-code "
                            "to run it") from None
        model_type = _model_type(source)
        unknown = ("does not recognize this architecture" in text
                   or (isinstance(exc, KeyError) and model_type is not None
                       and model_type in text))
        if unknown:
            import transformers

            raise UserError(f"could not load {source}: transformers {transformers.__version__} "
                            f"does not know its architecture (model_type {model_type!r}); "
                            "upgrade transformers") from None
        raise
    except OSError as exc:
        hint = (" HF_HUB_OFFLINE is set and it is not in the local cache; download it first "
                "or give a local directory." if hub_offline() else "")
        where = "" if Path(source).is_dir() else " (no such local directory; tried as a hub id)"
        raise UserError(f"could not load {source!r}{where}: {exc}.{hint}".replace("\n", " ")) \
            from None


def _model_type(source: str) -> str | None:
    """The ``model_type`` of a local model directory's config.json, if it says one."""
    try:
        value = json.loads((Path(source) / "config.json").read_text(encoding="utf-8")).get(
            "model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def is_adapter_dir(source: str) -> bool:
    p = Path(source)
    return (p / "adapter_config.json").is_file() and not (p / "config.json").is_file()


def adapter_base(source: str) -> str:
    """The base model a LoRA adapter names, checked. A relative path (adapters saved before
    bases were recorded absolute) is looked up in the working directory, then beside the
    adapter, before it is taken for a hub id."""
    base = json.loads((Path(source) / "adapter_config.json").read_text()).get(
        "base_model_name_or_path")
    if not base:
        raise UserError(f"{source}/adapter_config.json names no base_model_name_or_path")
    if not Path(base).is_absolute() and not Path(base).is_dir():
        beside = Path(source) / base
        if beside.is_dir():
            base = str(beside)
    try:
        return check_model_dir(base)
    except UserError as exc:
        raise UserError(f"the LoRA adapter {source} names its base model {base!r}: {exc}. "
                        "Run from the directory it was trained in, or set "
                        "base_model_name_or_path in its adapter_config.json") from None
