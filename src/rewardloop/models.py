"""Loading policies, reward/value models and tokenizers safely; LoRA; dtype and device.

Safe by default: weights load from safetensors only (a pickle can run code), and a model
repository's own Python code runs only with ``trust_remote_code=True``. A local directory is
checked before transformers sees it, so a user mistake is one clear ``UserError``; a string that
is not a local path is passed to transformers as a hub id (which downloads unless
``HF_HUB_OFFLINE=1``).

torch, transformers, peft, safetensors and huggingface_hub are imported inside the functions
that use them ("heavy" below): together they take seconds, and modules that only sometimes load a
model (``eval.evaluate``, and through it the loop's ``status``) import this one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rewardloop.errors import UserError
from rewardloop.model_files import (
    adapter_base,
    check_model_dir,
    hub_errors,
    hub_offline,
    is_adapter_dir,
)
from rewardloop.util.quiet import quiet_checkpointing_alias

if TYPE_CHECKING:
    import torch
    from torch import nn

HFModel = Any
"""A transformers ``PreTrainedModel`` or a peft model wrapping one, where its own methods
(``config``, ``save_pretrained``, ``disable_adapter``) are used: peft ships no type information
and ``nn.Module`` does not have them, so this type stays open."""

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
NEW_PAD_TOKEN = "<|pad|>"  # noqa: S105 (a vocabulary entry, not a secret)
ENSEMBLE_KEY = "reward_ensemble"  # config.json attribute: number of heads of an ensemble
GROUP_HEADS_KEY = "reward_group_heads"  # config.json attribute: the group of each head, in order


@dataclass(frozen=True)
class LoraSettings:
    """Low-rank adapters (Hu et al., 2021) on the chosen linear layers; the base stays frozen."""

    r: int = 16
    """Rank of each adapter."""
    alpha: int = 32
    """Scale: the adapter's update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input (keep 0 for RL: it makes log-probs noisy)."""
    target_modules: tuple[str, ...] | str = "all-linear"
    """Module names to adapt (e.g. ("q_proj", "v_proj")) or peft's "all-linear"."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError("LoRA r must be at least 1")
        if self.alpha <= 0:
            raise ValueError("LoRA alpha must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("LoRA dropout must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("LoRA target_modules must not be empty")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is a UserError."""
    import torch  # heavy

    if device not in DEVICES and not device.startswith("cuda:"):
        raise UserError(f"unknown device {device!r}; use one of {list(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but no CUDA GPU is available; use cpu")
    return torch.device(device)


def resolve_dtype(dtype: str = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """``auto`` → bfloat16 on a GPU that supports it, else float32 (CPU half precision is slow)."""
    import torch  # heavy

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {list(DTYPES)}")
    if dtype != "auto":
        return getattr(torch, dtype)
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(
    path: str | Path,
    *,
    trust_remote_code: bool = False,
    add_pad_token: bool = False,
    padding_side: str | None = None,
    chat_template: str | Path | None = None,
    sampling_only: bool = False,
):  # -> transformers.PreTrainedTokenizerBase
    """Load a tokenizer whose pad token is distinct from EOS.

    Pad == EOS (or no pad) is refused: the real EOS would be masked as padding and the model never
    learns to stop (TRL #1623, #734). With ``add_pad_token=True`` a new ``<|pad|>`` token is
    added instead; then call ``match_tokenizer`` on the model to grow its embeddings.
    ``sampling_only`` is for a tokenizer that only encodes prompts and decodes answers for an
    engine that pads nothing (vLLM): a model without a distinct pad keeps its vocabulary (the
    engine could not load a grown one) and gets ``pad_token_id`` None, so EOS is never taken
    for padding; the engines then fill with a placeholder id under their masks.
    ``padding_side`` ("left" for generation, "right" for training) overrides the saved one.
    ``chat_template`` is a Jinja chat-template file that replaces the tokenizer's own (or gives
    one to a tokenizer that has none); it is saved with the trained model.
    """
    from transformers import AutoTokenizer  # heavy

    source = check_model_dir(path)
    with hub_errors(source):
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, local_files_only=hub_offline())
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer of {source} has no EOS token; set eos_token and re-save it")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        problem = ("has no pad token" if tokenizer.pad_token_id is None
                   else f"uses its EOS token {tokenizer.eos_token!r} as the pad token")
        if sampling_only:
            tokenizer.pad_token = None
        elif not add_pad_token:
            raise UserError(
                f"tokenizer of {source} {problem}. Pad must differ from EOS, or the EOS is masked "
                "as padding and the model never learns to stop (TRL issue #1623). Pass "
                "--add-pad-token to add a new pad token, or set a distinct pad_token and re-save.")
        else:
            tokenizer.add_special_tokens({"pad_token": NEW_PAD_TOKEN})
            log.warning("tokenizer of %s %s; added %s as pad token", source, problem,
                        NEW_PAD_TOKEN)
    if padding_side is not None:
        if padding_side not in ("left", "right"):
            raise UserError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        tokenizer.padding_side = padding_side
    if chat_template is not None:
        tokenizer.chat_template = read_chat_template(chat_template)
    return tokenizer


def read_chat_template(path: str | Path) -> str:
    """The text of a Jinja chat-template file (``--chat-template``), checked to compile."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    file = Path(path)
    if not file.is_file():
        raise UserError(f"--chat-template {file}: no such file")
    text = file.read_text(encoding="utf-8")
    try:
        ImmutableSandboxedEnvironment().parse(text)
    except TemplateSyntaxError as exc:
        raise UserError(f"--chat-template {file}: not a valid Jinja template (line "
                        f"{exc.lineno}: {exc.message})") from None
    if "messages" not in text:
        raise UserError(f"--chat-template {file}: a chat template loops over `messages`; this "
                        "file never mentions them")
    return text


def match_tokenizer(model: HFModel, tokenizer: Any) -> None:
    """Grow the embeddings to the tokenizer (after ``add_pad_token``) and record its pad id."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def add_stop_token(model: Any, token_id: int | None) -> None:
    """List ``token_id`` among the EOS ids of ``model``'s generation config (kept first when it
    had one), so transformers' ``generate`` and every engine reading the saved model stop there:
    the chat template's end of turn that a base model's config may lack
    (``tokenize.end_of_turn_id``). A model without a generation config is left alone."""
    config = getattr(model, "generation_config", None)
    if token_id is None or config is None:
        return
    have = config.eos_token_id
    ids = list(have) if isinstance(have, list | tuple) else [] if have is None else [have]
    if token_id not in ids:
        config.eos_token_id = [*ids, int(token_id)]


def _read_config(source: str) -> dict[str, Any]:
    config = Path(source) / "config.json"
    return json.loads(config.read_text()) if config.is_file() else {}


def _from_pretrained(auto_cls: Any, source: str, *, dtype: str, device: str,
                     trust_remote_code: bool, **kwargs: Any) -> nn.Module:
    dev = resolve_device(device)
    with hub_errors(source):
        model = auto_cls.from_pretrained(
            source, dtype=resolve_dtype(dtype, dev), use_safetensors=True,
            trust_remote_code=trust_remote_code, local_files_only=hub_offline(),
            # transformers does not pass local_files_only on to its adapter lookup
            adapter_kwargs={"local_files_only": True} if hub_offline() else None, **kwargs,
        )
    return model.to(dev)


def load_policy(
    path: str | Path,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    lora: LoraSettings | None = None,
    trainable: bool = True,
) -> nn.Module:
    """A causal LM from a local dir, a LoRA adapter dir or a hub id, on ``device``.

    With ``lora``, fresh adapters are added (only they train). An adapter directory written by
    ``save_model`` loads its base and the adapters (trainable unless ``trainable=False``).
    """
    from transformers import AutoModelForCausalLM  # heavy

    source = check_model_dir(path)
    adapter = is_adapter_dir(source)
    if not adapter and is_classifier(source):
        raise UserError(f"{source} is a reward model (a sequence classifier), not a language "
                        "model: give a policy's directory (e.g. the model/ of a `train sft` "
                        "run)")
    if adapter:
        model = _load_adapter(AutoModelForCausalLM, source, dtype=dtype, device=device,
                              trust_remote_code=trust_remote_code, trainable=trainable)
    else:
        model = _from_pretrained(AutoModelForCausalLM, source, dtype=dtype, device=device,
                                 trust_remote_code=trust_remote_code)
    if lora is not None:
        if adapter:
            raise UserError(f"{source} already holds LoRA adapters; drop --lora-r to keep "
                            "training them, or merge them first")
        model = apply_lora(model, lora)
    return model


def is_classifier(source: str) -> bool:
    """Whether the saved config of ``source`` names a sequence classifier (a reward model)."""
    archs = _read_config(source).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def _load_adapter(auto_cls: Any, source: str, *, dtype: str, device: str,
                  trust_remote_code: bool, trainable: bool, **kwargs: Any) -> nn.Module:
    from peft import PeftModel  # heavy

    base: HFModel = _from_pretrained(auto_cls, adapter_base(source), dtype=dtype,
                                     device=device, trust_remote_code=trust_remote_code, **kwargs)
    saved = _saved_tokenizer(source, trust_remote_code)
    if saved is not None:
        # A run with --add-pad-token grew the embeddings: the adapter holds the grown matrix,
        # so the base must have as many rows before the adapter's weights go in.
        if len(saved) > base.get_input_embeddings().num_embeddings:
            base.resize_token_embeddings(len(saved))
        if saved.pad_token_id is not None:
            base.config.pad_token_id = saved.pad_token_id
    with quiet_checkpointing_alias():
        return PeftModel.from_pretrained(base, source, is_trainable=trainable)


def _saved_tokenizer(source: str, trust_remote_code: bool) -> Any:
    """The tokenizer saved beside an adapter (None when it has none)."""
    if not any((Path(source) / name).is_file()
               for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer  # heavy

    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)


def load_reward_model(
    path: str | Path,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    lora: LoraSettings | None = None,
    pad_token_id: int | None = None,
    trainable: bool = True,
    heads: int | None = 1,
) -> nn.Module:
    """A scalar-output sequence classifier (``num_labels=1``; ``heads`` K for a saved ensemble or
    --group-heads model, one reward per head; None: as many as the saved model has, for a
    model that is a starting point, reshaped by its caller).

    From a saved reward model it loads as is; from a causal LM it gets a fresh linear head
    (``score``) when it is to be trained (``trainable``); a frozen one, which would score with
    that random head, is refused. ``config.pad_token_id`` is set (from ``pad_token_id`` or the
    model's config), so transformers pools the score at the last non-pad token.
    """
    from transformers import AutoModelForSequenceClassification  # heavy

    source = check_model_dir(path)
    model: HFModel
    if is_adapter_dir(source):
        model = _load_adapter(AutoModelForSequenceClassification, source, dtype=dtype,
                              device=device, trust_remote_code=trust_remote_code,
                              trainable=trainable, num_labels=heads or 1)
    else:
        classifier = is_classifier(source)
        saved = saved_outputs(source) if classifier else 1
        if heads is None:  # as saved, when it is a reward model's heads (not a classifier's)
            config = _read_config(source)
            ours = config.get(ENSEMBLE_KEY) or config.get(GROUP_HEADS_KEY)
            heads = saved if ours else 1
        if saved != heads:
            raise UserError(f"{source} is a classifier with {saved} labels; a reward model "
                            "has exactly one (a scalar score)" if heads == 1 else
                            f"{source} has {saved} outputs, but its reward_stats.json "
                            f"and config name {heads} heads")
        if not classifier and not trainable:
            raise UserError(f"{source} is not a reward model (no trained score head: a "
                            "language model?); train one with `rewardloop train rm`")
        model = _from_pretrained(AutoModelForSequenceClassification, source, dtype=dtype,
                                 device=device, trust_remote_code=trust_remote_code,
                                 num_labels=heads)
        if not classifier:
            log.info("%s is not a reward model yet: added a fresh scalar head", source)
    pad = pad_token_id if pad_token_id is not None else model.config.pad_token_id
    if pad is None:
        raise UserError(f"{source} has no pad_token_id; the reward is read at the last non-pad "
                        "token, so load the tokenizer first and pass its pad_token_id")
    model.config.pad_token_id = pad
    if lora is not None:
        model = apply_lora(model, lora)
    return model


def saved_outputs(source: str) -> int:
    """Outputs of the saved sequence classifier in ``source`` (its heads)."""
    config = _read_config(source)
    labels = config.get("id2label")
    # transformers leaves its default of 2 labels out of config.json
    return len(labels) if labels else int(config.get("num_labels") or 2)


def new_score_head(model: HFModel, heads: int, keep: int = 0) -> None:
    """Give the classifier ``model`` a fresh ``score`` head of ``heads`` outputs, the first
    ``keep`` copied from its current head (a warm start's)."""
    import torch  # heavy
    from torch import nn

    old = model.score
    head = nn.Linear(old.in_features, heads, bias=old.bias is not None,
                     dtype=old.weight.dtype, device=old.weight.device)
    nn.init.normal_(head.weight, std=getattr(model.config, "initializer_range", 0.02))
    if head.bias is not None:
        nn.init.zeros_(head.bias)
    with torch.no_grad():
        head.weight[:keep].copy_(old.weight[:keep])
        if head.bias is not None:
            head.bias[:keep].copy_(old.bias[:keep])
    model.score = head
    model.config.num_labels = heads


def mean_score_head(model: HFModel) -> None:
    """One scalar head from a K-head reward model's: the mean of its heads, which scores every
    answer with the ensemble's mean reward (the heads are linear). The config no longer names
    an ensemble or groups."""
    import torch  # heavy
    from torch import nn

    old = model.score
    if old.out_features > 1:
        head = nn.Linear(old.in_features, 1, bias=old.bias is not None,
                         dtype=old.weight.dtype, device=old.weight.device)
        with torch.no_grad():
            head.weight.copy_(old.weight.mean(0, keepdim=True))
            if head.bias is not None:
                head.bias.copy_(old.bias.mean(0, keepdim=True))
        model.score = head
        model.config.num_labels = 1
    set_head_names(model.config, 1, ())


def set_head_names(config: Any, reward_heads: int, groups: Sequence[str]) -> None:
    """Record in ``config`` what the reward heads are: an ensemble of ``reward_heads`` (> 1),
    one per group of ``groups``; a scalar model records neither."""
    for key, value in ((ENSEMBLE_KEY, reward_heads if reward_heads > 1 else None),
                       (GROUP_HEADS_KEY, list(groups) or None)):
        if value is not None:
            setattr(config, key, value)
        elif hasattr(config, key):
            delattr(config, key)


def load_value_model(path: str | Path, **kwargs: Any) -> nn.Module:
    """A PPO value model: the same scalar-head model as a reward model (often started from one;
    a K-head reward model starts it from the mean of its heads, ``mean_score_head``). LoRA, if
    asked for, goes on after the head is made."""
    lora = kwargs.pop("lora", None)
    model: HFModel = load_reward_model(path, heads=None, **kwargs)
    if model.config.num_labels > 1 or hasattr(model.config, ENSEMBLE_KEY):
        mean_score_head(model)
    return apply_lora(model, lora) if lora is not None else model


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap ``model`` in peft LoRA adapters; for a classifier its head trains fully too."""
    from peft import LoraConfig, get_peft_model  # heavy

    is_classifier = any(name.endswith("ForSequenceClassification")
                        for name in (getattr(model.config, "architectures", None) or [])) or \
        type(model).__name__.endswith("ForSequenceClassification")
    targets = settings.target_modules
    config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        task_type="SEQ_CLS" if is_classifier else "CAUSAL_LM",
    )
    try:
        with quiet_checkpointing_alias():
            return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"cannot apply LoRA: {exc}") from None


def is_peft(model: nn.Module) -> bool:
    from peft import PeftModel  # heavy

    return isinstance(model, PeftModel)


@contextlib.contextmanager
def disable_adapter(model: HFModel) -> Iterator[nn.Module]:
    """Run the LoRA model as its frozen base (the reference policy) inside the block."""
    if not is_peft(model):
        raise TypeError("disable_adapter needs a LoRA (peft) model; load a separate reference "
                        "model for full fine-tuning")
    with model.disable_adapter():
        yield model


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0 (RL needs the same log-probs in rollout and update)."""
    from torch import nn  # heavy

    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout_rate"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in config.to_dict().items():
            if "dropout" in key and isinstance(value, float):
                setattr(config, key, 0.0)
    return model


def _save_tokenizer(tokenizer: Any, out: Path) -> None:
    """Save ``tokenizer`` padding on the right, as the model it came with was trained (the RL
    trainers pad prompts on the left to generate; a trainer that trusts the saved side must not
    inherit that)."""
    side = getattr(tokenizer, "padding_side", "right")
    tokenizer.padding_side = "right"
    try:
        tokenizer.save_pretrained(out)
    finally:
        tokenizer.padding_side = side


def save_model(model: HFModel, tokenizer: Any, out_dir: str | Path, *,
               merge_lora: bool = False, state_dict: dict[str, Any] | None = None
               ) -> nn.Module:
    """Write a transformers-loadable directory: full weights, or for LoRA the adapter, and a
    model card (README.md) naming the base model and the command line.

    ``merge_lora=True`` folds the adapters into the base weights IN PLACE and saves a plain
    model; the merged model is returned (use it instead of ``model`` afterwards).
    ``state_dict``: the full weights when ``model`` itself holds only shards (FSDP).
    """
    from rewardloop.model_card import CardInfo, command_line, write_model_card

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".tmp*"):  # a weights file of a save that was killed part-way
        if stale.is_file():
            stale.unlink()
    if merge_lora and is_peft(model):
        model = model.merge_and_unload()
    try:
        model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    except Exception as exc:  # safetensors says "disk full" in its own exception type
        if "No space left on device" in str(exc):
            raise OSError(errno.ENOSPC, "No space left on device", str(out)) from exc
        raise
    if is_peft(model):  # peft writes none: a loader would stop only where the base stops
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(out)
    if tokenizer is not None:
        _save_tokenizer(tokenizer, out)
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    write_model_card(out, CardInfo(base_model=base, command=command_line()))
    return model
