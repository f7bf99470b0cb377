"""Inference on PyTorch or MLX behind one `stream_generate(messages, settings)` signature.

Both backends take chat messages and `GenerationSettings` and yield `Response`s: one per generated
token, then a closing one carrying `finish_reason`. This module stays light: torch, transformers
and mlx are imported only when a backend is opened (`open_backend`), so `--help` pays nothing.

It also decides which model an adapter runs on (`read_adapter`, `choose_model`): a trained run's
`manifest.json` names its exact base; a checkpoint has only peft's `adapter_config.json`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from swallowctl.core.errors import UsageError
from swallowctl.infer.fit import check_fits, safetensors_header

if TYPE_CHECKING:
    import numpy as np

    from swallowctl.core.config import SwallowConfig
    from swallowctl.core.models import ResolvedModel

log = logging.getLogger(__name__)

# The seed's sampling defaults for Swallow (seed/swallow-usage.ja.md): "temperature 0.7 for
# natural variety in Japanese conversation, top_p 0.9 the standard, 512 tokens is enough".
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.9
DEFAULT_MAX_NEW_TOKENS = 512

Message = dict[str, str]
BackendName = Literal["torch", "mlx"]
FinishReason = Literal["stop", "length"]

MANIFEST = "manifest.json"  # written by `swallowctl train` into RUN/final
EXPORT_MANIFEST = "swallowctl_export.json"  # written by `swallowctl export`
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
MLX_WEIGHTS = "adapters.safetensors"


@dataclass(frozen=True)
class GenerationSettings:
    """How to pick tokens. `greedy` (or temperature 0) takes the most likely token every step.

    `max_new_tokens` counts the stop token too, as transformers' `generate` does: 2 is enough for
    a one-digit answer followed by `<|eot_id|>`.
    """

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    greedy: bool = False
    seed: int | None = None  # None: a fresh random stream every call

    @property
    def is_greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.greedy or self.temperature == 0.0


@dataclass(frozen=True)
class Response:
    """One step of a streamed answer, the same from both backends.

    Every generated token gives one response with its id; stop tokens are never yielded as
    tokens. The last response has `token=None` (or the final token when the length limit cut the
    answer) and a `finish_reason`.
    """

    text: str  # new text since the previous response ('' while a character is incomplete)
    token: int | None  # the token generated at this step
    tokens: int  # tokens generated so far (stop token excluded)
    tokens_per_s: float  # generation speed so far, prompt processing excluded
    peak_memory_gb: float  # peak memory so far: the GPU's, or on CPU the process's peak RSS
    finish_reason: FinishReason | None = None


@dataclass
class Completion:
    """A whole answer: what `collect` makes of a stream, and what batches return per row."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    tokens_per_s: float
    peak_memory_gb: float = 0.0


class InferenceBackend(Protocol):
    """What the session needs from a backend (TorchBackend or MlxBackend)."""

    name: BackendName
    model_name: str  # what the user asked for, for output rows and --json
    stop_token_ids: tuple[int, ...]

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """The chat-templated prompt, ending with the assistant header."""
        ...

    def stream_generate(
        self, messages: list[Message], settings: GenerationSettings
    ) -> Iterator[Response]:
        """Stream one answer token by token."""
        ...

    def generate_batch(
        self, batch: list[list[Message]], settings: GenerationSettings
    ) -> list[Completion]:
        """Answer several conversations (batched where the backend gains from it)."""
        ...

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Teacher-forced next-token logits, shape [len(token_ids), vocab], float32."""
        ...


def collect(stream: Iterable[Response]) -> Completion:
    """Drain a response stream into one `Completion`."""
    parts: list[str] = []
    ids: list[int] = []
    last: Response | None = None
    for r in stream:
        parts.append(r.text)
        if r.token is not None:
            ids.append(r.token)
        last = r
    if last is None:  # a backend always closes its stream; an empty one is our bug
        raise RuntimeError("the backend returned no response")
    return Completion(
        text="".join(parts),
        token_ids=ids,
        finish_reason=last.finish_reason or "length",
        tokens_per_s=last.tokens_per_s,
        peak_memory_gb=last.peak_memory_gb,
    )


class SpeedMeter:
    """Tokens/s the way mlx-lm counts them: the clock starts once the first token exists."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.count = 0

    def tick(self) -> float:
        """Count one generated token; return tokens/s so far."""
        now = time.perf_counter()
        self.count += 1
        if self.start is None:  # the first token's time is prompt processing, not generation
            self.start = now
            return 0.0
        return (self.count - 1) / max(now - self.start, 1e-9)

    @property
    def rate(self) -> float:
        """Tokens/s so far (0 before two tokens)."""
        if self.start is None or self.count < 2:
            return 0.0
        return (self.count - 1) / max(time.perf_counter() - self.start, 1e-9)


class IncrementalDecoder:
    """Text deltas from a growing token list without splitting multi-byte characters.

    Byte-level BPE can cut a Japanese character across tokens; decoding such a prefix gives
    U+FFFD. Text is held back until it decodes cleanly (the offsets scheme of TGI and vLLM).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context
        self.read = 0  # end of what has been emitted

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def add(self, token: int) -> str:
        """Append a token; return the newly complete text ('' if none yet)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end of the answer."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


# --- adapters and which base they run on ------------------------------------------------------


@dataclass(frozen=True)
class AdapterInfo:
    """A trained adapter on disk: a peft LoRA (`swallowctl train`) or an mlx-lm adapter (export)."""

    path: Path
    format: Literal["peft", "mlx"]
    base_name: str | None  # what the base was called in training (alias, hub id, dir, builtin)
    base_revision: str | None  # the commit it was trained on when known, else the revision
    manifest: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def run_dir(self) -> Path:
        """The training run directory (the parent of final/ or checkpoint-N/)."""
        return self.path.parent


def read_adapter(path: Path) -> AdapterInfo:
    """Inspect an adapter folder (RUN/final, RUN/checkpoint-N, an export, or RUN itself).

    Raises:
        UsageError: the folder does not exist or holds no adapter we can read safely.
    """
    path = path.expanduser()
    if not path.is_dir():
        raise UsageError(f"--adapter {path}: no such folder", hint="give RUN_DIR/final")
    if not (path / PEFT_CONFIG).is_file() and (path / "final" / PEFT_CONFIG).is_file():
        log.info("using %s", path / "final")
        path = path / "final"
    config = _read_json(path / PEFT_CONFIG)
    if config is None:
        raise UsageError(
            f"--adapter {path}: no {PEFT_CONFIG} here",
            hint="give a trained adapter folder such as RUN_DIR/final or RUN_DIR/checkpoint-N",
        )
    if "lora_parameters" in config or "fine_tune_type" in config:
        return _mlx_adapter(path)
    if not (path / PEFT_WEIGHTS).is_file():
        bin_only = (path / "adapter_model.bin").is_file()
        raise UsageError(
            f"--adapter {path}: no {PEFT_WEIGHTS}"
            + (" (only a pickle adapter_model.bin, which we do not load)" if bin_only else ""),
            hint="pickle files can run code when loaded; save the adapter with safetensors",
        )
    safetensors_header(path / PEFT_WEIGHTS)  # torn or junk: say so before a model loads
    manifest = _read_json(path / MANIFEST)
    base = (manifest or {}).get("base_model") or {}
    if not isinstance(base, dict):
        raise UsageError(
            f"{path / MANIFEST}: base_model is {type(base).__name__}, expected an object",
            hint="written by another swallowctl version? pass --model with the base",
        )
    name = base.get("name") or config.get("base_model_name_or_path")
    revision = base.get("commit") or base.get("revision") or config.get("revision")
    return AdapterInfo(path, "peft", name, revision, manifest)


def _mlx_adapter(path: Path) -> AdapterInfo:
    if not (path / MLX_WEIGHTS).is_file():
        raise UsageError(f"--adapter {path}: an mlx-lm adapter config but no {MLX_WEIGHTS}")
    export = _read_json(path / EXPORT_MANIFEST) or {}
    base = export.get("base_model") or {}
    return AdapterInfo(
        path, "mlx", base.get("name"), base.get("commit") or base.get("revision"), export
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def choose_model(
    model: str | None,
    adapter: AdapterInfo | None,
    cfg: SwallowConfig,
    *,
    backend: BackendName,
) -> tuple[ResolvedModel, str]:
    """Which base to load: `--model`, else the adapter's base, else the config's model.

    Returns the resolved model (stop ids, pad, shape) and the id the backend loads. On MLX a known
    Hub model that was not named explicitly becomes its MLX 4-bit twin from the registry.
    """
    from swallowctl.core.models import resolve

    revision = cfg.model.revision
    if model is not None:
        name = model
    elif adapter is not None and adapter.base_name:
        name, revision = adapter.base_name, adapter.base_revision
    else:
        name = cfg.model.name_or_path
    resolved = resolve(name, revision)
    if model is not None and adapter is not None and adapter.base_name not in (None, model):
        log.warning(
            "the adapter was trained on %s; running it on %s as asked", adapter.base_name, model
        )
    load_id = resolved.model_id
    twin = resolved.info.mlx_id if resolved.info else None
    if backend == "mlx" and model is None and twin and not resolved.is_local:
        log.info("MLX: using %s, the MLX twin of %s", twin, resolved.model_id)
        load_id = twin
    return resolved, load_id


def open_backend(
    backend: BackendName,
    resolved: ResolvedModel,
    load_id: str,
    cfg: SwallowConfig,
    adapter: AdapterInfo | None = None,
) -> InferenceBackend:
    """Load the model (and adapter) on the chosen backend.

    Raises:
        MissingDependencyError: the backend's libraries are not installed (says what to install).
        UsageError: an adapter the backend cannot use.
    """
    if adapter is not None and adapter.format == "peft":
        check_fits(adapter.path / PEFT_WEIGHTS, resolved.name, resolved.architecture)
    if backend == "mlx":
        from swallowctl.infer.mlx_backend import MlxBackend

        return MlxBackend.load(resolved, load_id, adapter=adapter)
    if adapter is not None and adapter.format == "mlx":
        raise UsageError(
            f"--adapter {adapter.path} is an mlx-lm adapter; PyTorch needs the peft one",
            hint="use --backend mlx, or give the training run's final/ folder",
        )
    from swallowctl.infer.torch_backend import TorchBackend

    return TorchBackend.load(resolved, cfg, adapter=adapter)
