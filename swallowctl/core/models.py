"""Known models: alias -> Hub id, MLX twin, architecture numbers, stop/pad tokens, licence note.

Pure data plus name resolution. Nothing heavy is imported here: `huggingface_hub` is imported only
inside `resolve()` when an unknown Hub id has to be looked up, and the embedded tiny model's
builder (`swallowctl.core.tiny`) only when a `builtin:` name is resolved.

Where the numbers come from (checked against public copies of the files, see each entry):
config.json / generation_config.json on the Hub, or exact copies of them in derived repos that
name the original as `_name_or_path`. Download sizes are the bf16 tensor bytes, which equal
2 x `Architecture.param_count()` (the test suite checks this).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from swallowctl.core.errors import RuntimeFailure, SwallowError, UsageError

logger = logging.getLogger(__name__)

ChatFormat = Literal["llama3", "chatml"]
Source = Literal["registry", "local", "hub-config", "builtin"]

# Kept equal to swallowctl.core.tiny.TINY_ID / TINY_REWARD_ID (a test checks it): importing the
# builder at module level would make every `--help` pay for it.
TINY_ID = "builtin:tiny-ja"
TINY_REWARD_ID = "builtin:tiny-ja-reward"
_BUILTIN_KINDS: dict[str, Literal["policy", "reward"]] = {
    TINY_ID: "policy",
    TINY_REWARD_ID: "reward",
}


@dataclass(frozen=True)
class Architecture:
    """The shape numbers of a decoder-only transformer, as its config.json states them."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int  # 0 when the config does not say
    model_type: str

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> Architecture:
        """Read the numbers from a Hugging Face config.json dict.

        Multimodal configs keep the language model under `text_config`; that part is read then.
        Raises ValueError naming the first missing key.
        """
        if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
            config = {"model_type": config.get("model_type", ""), **config["text_config"]}
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            layers = int(config["num_hidden_layers"])
            intermediate = int(config["intermediate_size"])
            vocab = int(config["vocab_size"])
        except KeyError as e:
            raise ValueError(f"config.json has no '{e.args[0]}'") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"config.json has a non-integer shape value ({e})") from None
        # Older Llama-2-style configs omit num_key_value_heads (plain multi-head attention), and
        # some write "head_dim": null; both fall back to what transformers derives.
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
        return cls(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(kv_heads),
            head_dim=int(head_dim),
            intermediate_size=intermediate,
            vocab_size=vocab,
            # LlamaConfig and Qwen3Config both default to untied embeddings.
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=int(config.get("max_position_embeddings") or 0),
            model_type=str(config.get("model_type", "")),
        )

    def param_count(self) -> int:
        """Parameter count of a dense Llama-style decoder (SwiGLU MLP, RMSNorm, no biases).

        Qwen3 adds a per-head RMSNorm on queries and keys. Exact for the registry's models.
        """
        h, d = self.hidden_size, self.head_dim
        q_out, kv_out = self.num_attention_heads * d, self.num_key_value_heads * d
        attention = h * q_out + 2 * h * kv_out + q_out * h
        mlp = 3 * h * self.intermediate_size
        norms = 2 * h + (2 * d if self.model_type == "qwen3" else 0)
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * (attention + mlp + norms) + h + embeddings

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Bytes of K and V cache one token costs across all layers (bf16 by default)."""
        per_layer = self.num_key_value_heads * self.head_dim * bytes_per_value
        return 2 * self.num_hidden_layers * per_layer


@dataclass(frozen=True)
class ModelInfo:
    """One known model: where it lives, its shape, and the tokens generation must respect."""

    key: str
    aliases: tuple[str, ...]
    hub_id: str
    mlx_id: str | None  # an MLX 4-bit twin on the Hub, or None
    architecture: Architecture | None  # None for builtins: read from the built files by resolve()
    stop_token_ids: tuple[int, ...]  # generation stops on every one of them
    pad_token_id: int | None
    pad_token: str | None
    bos_token_id: int | None  # None where the tokenizer adds no BOS
    chat_format: ChatFormat
    download_bytes: int | None  # safetensors weights in bf16, approximate
    gated: bool  # the Hub asks to accept the licence before download
    license: str
    description: str

    @property
    def names(self) -> tuple[str, ...]:
        """Every name `lookup()` accepts for this model."""
        return (self.key, *self.aliases, self.hub_id, *([self.mlx_id] if self.mlx_id else []))


# ---- Llama 3.1 family facts ---------------------------------------------------------------
# Verified in meta-llama/Llama-3.1-8B-Instruct's config.json (copies that name it as
# _name_or_path, incl. an HF-cache snapshot) and Llama-3.1-Swallow-8B-Instruct-v0.3's
# config.json / generation_config.json on the Hub: hidden 4096, 32 layers, 32 heads, 8 KV heads,
# head_dim 128, intermediate 14336, vocab 128256, untied, eos [128001, 128008, 128009], bos 128000.
_LLAMA31_STOP = (128001, 128008, 128009)  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
_LLAMA31_BOS = 128000  # <|begin_of_text|>
# The Llama 3.1 tokenizer reserves 128004 for right padding in fine-tuning; it is no stop token
# (a GGUF of Llama-3.1-Swallow-8B records padding_token_id 128004).
_LLAMA31_PAD = (128004, "<|finetune_right_pad_id|>")
_LLAMA31_8B_BYTES = 16_060_522_496  # 8,030,261,248 params x 2 B = the index's "total_size"


def _llama31_8b(max_position_embeddings: int) -> Architecture:
    return Architecture(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=14336,
        vocab_size=128256,
        tie_word_embeddings=False,
        max_position_embeddings=max_position_embeddings,
        model_type="llama",
    )


# ---- Qwen3 family facts --------------------------------------------------------------------
# generation_config.json of Qwen3 checkpoints: eos [151645 <|im_end|>, 151643 <|endoftext|>],
# pad 151643 (seen in several Qwen3 fine-tunes; not in the original repo's file itself).
_QWEN3_STOP = (151645, 151643)
# Qwen's own pad, <|endoftext|>, is one of the stop ids: padding with it would make padding and
# end-of-answer the same id, so masks, the "last real response token" and the missing-EOS penalty
# would all misfire. <|vision_pad|> (151654) is a special token a text-only Qwen3 never sees or
# emits (its id is in the shared Qwen2.5/Qwen3 added_tokens; unsloth's Qwen3-8B uses it as pad).
_QWEN3_PAD = (151654, "<|vision_pad|>")

_REGISTRY: tuple[ModelInfo, ...] = (
    ModelInfo(
        key="swallow-8b-v0.5",
        aliases=("swallow-8b", "swallow"),
        hub_id="tokyotech-llm/Llama-3.1-Swallow-8B-Instruct-v0.5",
        mlx_id="mlx-community/Llama-3.1-Swallow-8B-Instruct-v0.5-4bit",  # named in the seed notes
        # Unverified: this repo's config.json was not found in any public copy. It is Llama 3.1 8B
        # continued-pretrained (model card), so the shape is Llama 3.1 8B's. max_position 8192 as
        # in v0.3's verified config (same Megatron-LM export); resolving a downloaded copy reads
        # the real value.
        architecture=_llama31_8b(max_position_embeddings=8192),
        stop_token_ids=_LLAMA31_STOP,
        pad_token_id=_LLAMA31_PAD[0],
        pad_token=_LLAMA31_PAD[1],
        bos_token_id=_LLAMA31_BOS,
        chat_format="llama3",
        download_bytes=_LLAMA31_8B_BYTES,
        gated=False,
        license="Llama 3.3 Community License + Gemma Terms of Use restrictions; no Hub gate",
        description="Llama 3.1 Swallow 8B Instruct v0.5 (Science Tokyo): Japanese-tuned Llama 3.1",
    ),
    ModelInfo(
        key="swallow-8b-v0.3",
        aliases=(),
        hub_id="tokyotech-llm/Llama-3.1-Swallow-8B-Instruct-v0.3",
        # One public project loads this id; not confirmed on the Hub itself.
        mlx_id="mlx-community/Llama-3.1-Swallow-8B-Instruct-v0.3-4bit",
        architecture=_llama31_8b(max_position_embeddings=8192),  # verified: its config says 8192
        stop_token_ids=_LLAMA31_STOP,
        pad_token_id=_LLAMA31_PAD[0],
        pad_token=_LLAMA31_PAD[1],
        bos_token_id=_LLAMA31_BOS,
        chat_format="llama3",
        download_bytes=_LLAMA31_8B_BYTES,
        gated=False,
        license="Llama 3.1 Community License + Gemma Terms of Use restrictions; no Hub gate",
        description="Llama 3.1 Swallow 8B Instruct v0.3: the previous Swallow 8B instruct release",
    ),
    ModelInfo(
        key="llama-3.1-8b",
        aliases=(),
        hub_id="meta-llama/Llama-3.1-8B-Instruct",
        mlx_id="mlx-community/Meta-Llama-3.1-8B-Instruct-4bit",
        architecture=_llama31_8b(max_position_embeddings=131072),  # verified
        stop_token_ids=_LLAMA31_STOP,
        pad_token_id=_LLAMA31_PAD[0],
        pad_token=_LLAMA31_PAD[1],
        bos_token_id=_LLAMA31_BOS,
        chat_format="llama3",
        download_bytes=_LLAMA31_8B_BYTES,
        gated=True,
        license="Llama 3.1 Community License; gated: accept it on the Hub, then 'hf auth login'",
        description="Meta Llama 3.1 8B Instruct: the base Swallow was trained from",
    ),
    ModelInfo(
        key="qwen3-8b",
        aliases=(),
        hub_id="Qwen/Qwen3-8B",
        mlx_id="mlx-community/Qwen3-8B-4bit",
        # Verified: a commit titled "Copy config.json from Qwen/Qwen3-8B" carries these numbers.
        architecture=Architecture(
            hidden_size=4096,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=12288,
            vocab_size=151936,
            tie_word_embeddings=False,
            max_position_embeddings=40960,
            model_type="qwen3",
        ),
        stop_token_ids=_QWEN3_STOP,
        pad_token_id=_QWEN3_PAD[0],
        pad_token=_QWEN3_PAD[1],
        bos_token_id=None,  # Qwen's tokenizer adds no BOS (bos_token null)
        chat_format="chatml",
        download_bytes=16_381_470_720,  # 8,190,735,360 params x 2 B
        gated=False,
        license="Apache-2.0; no Hub gate",
        description="Qwen3 8B (Alibaba): multilingual, thinking/non-thinking chat",
    ),
    ModelInfo(
        key="qwen3-14b",
        aliases=(),
        hub_id="Qwen/Qwen3-14B",
        mlx_id="mlx-community/Qwen3-14B-4bit",
        # Verified: model card (40 layers, 40 Q / 8 KV heads, 32k native context) and the
        # config.json of a Qwen3-14B fine-tune (hidden 5120, intermediate 17408, head_dim 128,
        # vocab 151936, untied, original max_position 40960).
        architecture=Architecture(
            hidden_size=5120,
            num_hidden_layers=40,
            num_attention_heads=40,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=17408,
            vocab_size=151936,
            tie_word_embeddings=False,
            max_position_embeddings=40960,
            model_type="qwen3",
        ),
        stop_token_ids=_QWEN3_STOP,
        pad_token_id=_QWEN3_PAD[0],
        pad_token=_QWEN3_PAD[1],
        bos_token_id=None,
        chat_format="chatml",
        download_bytes=29_536_614_400,  # 14,768,307,200 params x 2 B
        gated=False,
        license="Apache-2.0; no Hub gate",
        description="Qwen3 14B (Alibaba): larger multilingual model, needs ~10 GB in 4-bit",
    ),
    ModelInfo(
        key="tiny-ja",
        aliases=("tiny",),
        hub_id=TINY_ID,
        mlx_id=None,
        architecture=None,  # read from the built config.json at resolve time
        stop_token_ids=(),  # idem, from its generation_config.json
        pad_token_id=None,
        pad_token=None,
        bos_token_id=None,
        chat_format="llama3",
        download_bytes=None,
        gated=False,
        license="built locally from random weights; no licence terms",
        description="embedded tiny Llama for tests and the quickstart (random weights, gibberish)",
    ),
)

DEFAULT_MODEL = _REGISTRY[0].hub_id

_BY_NAME: dict[str, ModelInfo] = {n.lower(): m for m in _REGISTRY for n in m.names}


def known_models() -> list[ModelInfo]:
    """Every registry entry, the default first."""
    return list(_REGISTRY)


def lookup(name: str) -> ModelInfo | None:
    """Find a known model by key, alias, Hub id or MLX id (case-insensitive); None if unknown."""
    return _BY_NAME.get(name.strip().lower())


def close_matches(name: str, n: int = 3) -> list[str]:
    """Known names that look like `name` (for 'did you mean' hints)."""
    lowered = name.strip().lower()
    # Short names are compared with short names and org/name with Hub ids, so that 'swalow-8b'
    # finds 'swallow-8b' and 'qwen/qwen3-7b' finds 'Qwen/Qwen3-8B'.
    if "/" in lowered:
        pool = {m.hub_id.lower(): m.hub_id for m in _REGISTRY}
    else:
        pool = {a.lower(): a for m in _REGISTRY for a in (m.key, *m.aliases)}
    return [pool[f] for f in difflib.get_close_matches(lowered, list(pool), n=n, cutoff=0.6)]


@dataclass(frozen=True)
class ResolvedModel:
    """A model name turned into something loadable, plus the facts generation and memory need.

    `pad_token_id` is None only for an unknown model whose files name no usable pad token (the
    caller must then choose one that is not a stop id).
    """

    name: str  # as the user gave it
    model_id: str  # Hub id, or the absolute path of a local folder
    source: Source
    info: ModelInfo | None
    architecture: Architecture
    stop_token_ids: tuple[int, ...]
    pad_token_id: int | None
    pad_token: str | None
    bos_token_id: int | None
    chat_format: ChatFormat | None
    revision: str | None = None
    commit: str | None = None  # the Hub commit config.json was read at, when known

    @property
    def is_local(self) -> bool:
        """True when `model_id` is a folder on this machine."""
        return self.source in ("local", "builtin")


def resolve(
    name: str, revision: str | None = None, *, local_files_only: bool = False
) -> ResolvedModel:
    """Turn a model name (alias, Hub id, local folder or builtin) into a `ResolvedModel`.

    Known names resolve offline from the registry. A local folder is read from its config.json.
    An unknown Hub id costs one small download: config.json (and generation_config.json for the
    stop ids) through huggingface_hub, which honours HF_ENDPOINT, HF_HUB_OFFLINE and its cache.

    Raises UsageError for names that do not exist, RuntimeFailure for gated, offline or
    unreachable cases; every message is one line naming the model and what to do.
    """
    raw = name.strip()
    if not raw:
        raise UsageError("no model name given", hint=f"the default is {DEFAULT_MODEL}")
    if raw.lower().startswith("builtin:"):
        return _resolve_builtin(raw, raw.lower())
    path = Path(raw).expanduser()
    # transformers' own rule: an existing folder wins over a Hub id of the same spelling.
    if path.is_dir() and (path / "config.json").is_file():
        return _resolve_dir(raw, path, source="local")
    info = lookup(raw)
    if info is not None:
        if info.hub_id in _BUILTIN_KINDS:
            return _resolve_builtin(raw, info.hub_id)
        return _from_registry(raw, info, revision)
    if _looks_like_path(raw):
        what = "has no config.json" if path.is_dir() else "does not exist"
        raise UsageError(
            f"model folder '{raw}' {what}",
            hint="point at a folder holding a transformers checkpoint (config.json, *.safetensors)",
        )
    if "/" in raw:
        return _resolve_hub(raw, revision, local_files_only=local_files_only)
    raise UsageError(f"unknown model '{raw}'", hint=_suggestion_hint(raw))


# ---- resolution helpers -------------------------------------------------------------------


def _from_registry(name: str, info: ModelInfo, revision: str | None) -> ResolvedModel:
    assert info.architecture is not None  # only builtins lack it, and they never come here
    # Asked for by the MLX twin's id: load that repo, with the same shape and tokens.
    model_id = info.mlx_id if info.mlx_id and name.lower() == info.mlx_id.lower() else info.hub_id
    return ResolvedModel(
        name=name,
        model_id=model_id,
        source="registry",
        info=info,
        architecture=info.architecture,
        stop_token_ids=info.stop_token_ids,
        pad_token_id=info.pad_token_id,
        pad_token=info.pad_token,
        bos_token_id=info.bos_token_id,
        chat_format=info.chat_format,
        revision=revision,
    )


def _resolve_builtin(name: str, builtin_id: str) -> ResolvedModel:
    kind = _BUILTIN_KINDS.get(builtin_id)
    if kind is None:
        raise UsageError(
            f"unknown builtin model '{name}'", hint=f"builtins: {', '.join(_BUILTIN_KINDS)}"
        )
    from swallowctl.core.tiny import tiny_path  # builds (or reuses) the cached tiny model

    return _resolve_dir(name, tiny_path(kind), source="builtin", info=lookup(builtin_id))


def _resolve_dir(
    name: str, path: Path, *, source: Source, info: ModelInfo | None = None
) -> ResolvedModel:
    path = path.resolve()
    config = _read_json(path / "config.json", name, required=True)
    gen = _read_json(path / "generation_config.json", name, required=False)
    if info is None:
        info = _info_from_cache_path(path)
    # A registry entry (one with numbers) knows the pad and BOS its files leave out; a builtin's
    # entry has no numbers, so everything comes from its built files.
    known = info if info is not None and info.architecture is not None else None
    stops = _stop_ids(config, gen) or (known.stop_token_ids if known else ())
    pad_id: int | None
    if known is not None and known.pad_token_id is not None:
        pad_id, pad_text = known.pad_token_id, known.pad_token
    else:
        pad_id, pad_text = _pad_from_dir(path, config, gen, stops)
    if known is not None:
        bos: int | None = known.bos_token_id
    else:
        bos = next(iter(_ids(config.get("bos_token_id")) + _ids(gen.get("bos_token_id"))), None)
    chat_format = (known.chat_format if known else None) or _guess_chat_format(config, path)
    return ResolvedModel(
        name=name,
        model_id=str(path),
        source=source,
        info=info,
        architecture=_architecture(config, name),
        stop_token_ids=stops,
        pad_token_id=pad_id,
        pad_token=pad_text,
        bos_token_id=bos,
        chat_format=chat_format or (info.chat_format if info else None),
    )


def _resolve_hub(repo_id: str, revision: str | None, *, local_files_only: bool) -> ResolvedModel:
    config_path = Path(_hub_download(repo_id, "config.json", revision, local_files_only))
    config = _read_json(config_path, repo_id, required=True)
    gen: dict[str, Any] = {}
    try:
        gen = _read_json(
            Path(_hub_download(repo_id, "generation_config.json", revision, local_files_only)),
            repo_id,
            required=False,
        )
    except SwallowError as e:  # optional file: its absence (or a hiccup) only costs stop ids
        logger.debug("no generation_config.json for %s: %s", repo_id, e.message)
    stops = _stop_ids(config, gen)
    pad = _pad_id(config, gen, stops)
    bos = next(iter(_ids(config.get("bos_token_id")) + _ids(gen.get("bos_token_id"))), None)
    # hf_hub_download returns .../snapshots/<commit>/config.json
    commit = config_path.parent.name if _COMMIT.fullmatch(config_path.parent.name) else None
    return ResolvedModel(
        name=repo_id,
        model_id=repo_id,
        source="hub-config",
        info=None,
        architecture=_architecture(config, repo_id),
        stop_token_ids=stops,
        pad_token_id=pad,
        pad_token=None,
        bos_token_id=bos,
        chat_format=_guess_chat_format(config, None),
        revision=revision,
        commit=commit,
    )


_COMMIT = re.compile(r"[0-9a-f]{40}")
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{6,}")


def _looks_like_path(name: str) -> bool:
    # Hub ids are exactly "org/name" and never start with "." or "~".
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _suggestion_hint(name: str) -> str:
    matches = close_matches(name)
    known = ", ".join(m.hub_id if m.hub_id in _BUILTIN_KINDS else m.key for m in _REGISTRY)
    if matches:
        return f"did you mean {' or '.join(repr(m) for m in matches)}? known: {known}"
    return f"known: {known}; or give a Hub id (org/name) or a local folder"


def _architecture(config: dict[str, Any], name: str) -> Architecture:
    try:
        return Architecture.from_hf_config(config)
    except ValueError as e:
        raise UsageError(
            f"model '{name}': {e}", hint="swallowctl needs a decoder-only language model"
        ) from None


def _read_json(path: Path, name: str, *, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise UsageError(f"model '{name}' has no {path.name}", hint=f"looked in {path.parent}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: not readable JSON ({_one_line(e)})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object")
    return data


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _stop_ids(config: dict[str, Any], gen: dict[str, Any]) -> tuple[int, ...]:
    """generation_config's eos (what `generate` stops on) first, then config.json's extras."""
    out: list[int] = []
    for i in _ids(gen.get("eos_token_id")) + _ids(config.get("eos_token_id")):
        if i not in out:
            out.append(i)
    return tuple(out)


def _pad_id(config: dict[str, Any], gen: dict[str, Any], stops: tuple[int, ...]) -> int | None:
    for candidate in (*_ids(config.get("pad_token_id")), *_ids(gen.get("pad_token_id"))):
        if candidate not in stops:
            return candidate
    return None


def _pad_from_dir(
    path: Path, config: dict[str, Any], gen: dict[str, Any], stops: tuple[int, ...]
) -> tuple[int | None, str | None]:
    """The tokenizer's pad token (text and id) when it is no stop id; else config's pad id."""
    tok_config = _read_json(path / "tokenizer_config.json", str(path), required=False)
    pad_text = tok_config.get("pad_token")
    if isinstance(pad_text, dict):  # older files store AddedToken dicts
        pad_text = pad_text.get("content")
    if isinstance(pad_text, str):
        pad_id = _added_token_id(path, tok_config, pad_text)
        if pad_id is not None and pad_id not in stops:
            return pad_id, pad_text
        if pad_id is not None:
            logger.warning("%s: pad token %r is a stop id; not using it as pad", path, pad_text)
    return _pad_id(config, gen, stops), None


def _added_token_id(path: Path, tok_config: dict[str, Any], text: str) -> int | None:
    decoder = tok_config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for key, entry in decoder.items():
            if isinstance(entry, dict) and entry.get("content") == text and key.isdigit():
                return int(key)
    try:  # tokenizer.json can be tens of MB; read only when tokenizer_config did not say
        tokenizer = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for entry in tokenizer.get("added_tokens", []) if isinstance(tokenizer, dict) else []:
        if isinstance(entry, dict) and entry.get("content") == text:
            return entry.get("id") if isinstance(entry.get("id"), int) else None
    return None


def _guess_chat_format(config: dict[str, Any], path: Path | None) -> ChatFormat | None:
    template = ""
    if path is not None:
        tok_config = _read_json(path / "tokenizer_config.json", str(path), required=False)
        template = str(tok_config.get("chat_template") or "")
        jinja = path / "chat_template.jinja"  # transformers 5 writes the template beside
        if not template and jinja.is_file():
            template = jinja.read_text(encoding="utf-8", errors="replace")
    if "<|start_header_id|>" in template:
        return "llama3"
    if "<|im_start|>" in template:
        return "chatml"
    model_type = str(config.get("model_type", ""))
    if model_type.startswith("qwen"):
        return "chatml"
    if model_type == "llama" and config.get("vocab_size") == 128256:  # the Llama 3 tokenizer
        return "llama3"
    return None


def _info_from_cache_path(path: Path) -> ModelInfo | None:
    # An HF-cache snapshot (.../models--org--name/snapshots/<commit>) of a known model.
    for part in path.parts:
        if part.startswith("models--"):
            return lookup(part.removeprefix("models--").replace("--", "/"))
    return None


def _one_line(error: BaseException | str) -> str:
    """First line of an error text, shortened, with anything token-shaped masked."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return _TOKEN_LIKE.sub("hf_***", text)[:200]


def _env_true(var: str) -> bool:
    return os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_download(repo_id: str, filename: str, revision: str | None, local_files_only: bool) -> str:
    """One small file through huggingface_hub's cache; Hub errors become SwallowErrors."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE once at import; read them again so a
    # value set later in this process (tests, a library caller) is honoured too.
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or constants.ENDPOINT
    offline = (
        local_files_only
        or constants.HF_HUB_OFFLINE
        or _env_true("HF_HUB_OFFLINE")
        or _env_true("TRANSFORMERS_OFFLINE")
    )
    at = f"@{revision}" if revision else ""
    # An unreachable Hub costs ~23 s of huggingface_hub's own retries before the error: say why.
    source = "the cache" if offline else endpoint
    logger.info("reading %s of %s%s from %s", filename, repo_id, at, source)
    try:
        return hf_hub_download(
            repo_id, filename, revision=revision, endpoint=endpoint, local_files_only=offline
        )
    except HFValidationError as e:
        raise UsageError(f"'{repo_id}' is not a valid Hub model id ({_one_line(e)})") from e
    except GatedRepoError as e:
        raise RuntimeFailure(
            f"model '{repo_id}' is gated: accept its licence at {endpoint}/{repo_id}",
            hint="then log in with 'hf auth login' (or set HF_TOKEN) and retry",
        ) from e
    except RepositoryNotFoundError as e:
        matches = close_matches(repo_id)
        maybe = f"did you mean {' or '.join(repr(m) for m in matches)}? " if matches else ""
        raise UsageError(
            f"model '{repo_id}' was not found on the Hub ({endpoint})",
            hint=maybe + "check the spelling (org/name); a private repo needs 'hf auth login'",
        ) from e
    except RevisionNotFoundError as e:
        raise UsageError(
            f"model '{repo_id}' has no revision '{revision}'",
            hint="use a branch, tag or commit that exists",
        ) from e
    except RemoteEntryNotFoundError as e:
        raise UsageError(
            f"model '{repo_id}{at}' has no {filename}: not a transformers checkpoint?"
        ) from e
    except LocalEntryNotFoundError as e:
        if offline:
            raise RuntimeFailure(
                f"offline, and {filename} of '{repo_id}{at}' is not in the Hugging Face cache",
                hint="fetch it once while online ('swallowctl download'), or unset HF_HUB_OFFLINE",
            ) from e
        raise RuntimeFailure(
            f"could not reach the Hub at {endpoint} to read {filename} of '{repo_id}{at}', "
            "and it is not cached",
            hint="check the network, proxy or HF_ENDPOINT; HF_HUB_OFFLINE=1 uses the cache only",
        ) from e
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise RuntimeFailure(
                f"the Hub refused access to '{repo_id}' (HTTP {status})",
                hint="accept the model's licence on its Hub page and log in with 'hf auth login'",
            ) from e
        raise RuntimeFailure(
            f"the Hub failed while reading {filename} of '{repo_id}' (HTTP {status})",
            hint="retry later",
        ) from e
    except (OSError, ValueError, httpx2.HTTPError) as e:  # network, proxies, cache permissions
        raise RuntimeFailure(
            f"could not read {filename} of '{repo_id}' from the Hub: {_one_line(e)}"
        ) from e
