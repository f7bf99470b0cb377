"""MLX backend (Apple Silicon; Linux CPU with `mlx[cpu]`): mlx-lm's load and stream_generate.

Inference only: PPO training needs PyTorch. This is the one module that imports mlx, and only
inside functions, so a machine without MLX gets a MissingDependencyError that says what to install
instead of an ImportError at startup.

mlx-lm cannot read peft adapters (other key names, transposed A/B, `scale` instead of alpha/r).
A peft adapter is rewritten into mlx-lm's format once (`swallowctl.export.peft_to_mlx_adapter`)
and cached under `$SWALLOWCTL_CACHE/mlx-adapters/<hash of the adapter files>`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swallowctl.core.errors import MissingDependencyError, RuntimeFailure
from swallowctl.infer import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    AdapterInfo,
    BackendName,
    Completion,
    GenerationSettings,
    IncrementalDecoder,
    Message,
    Response,
    collect,
)

if TYPE_CHECKING:
    import numpy as np

    from swallowctl.core.models import ResolvedModel

log = logging.getLogger(__name__)

# Bump when peft_to_mlx_adapter changes what it writes: it is part of the cache key.
CONVERTER_VERSION = 1


def require_mlx() -> None:
    """Import mlx and mlx-lm or raise a MissingDependencyError naming the install command."""
    try:
        # The top-level package first: once imported, `mlx.core` and `mlx_lm` stay cached in
        # sys.modules and would import fine even where `mlx` itself is blocked or gone.
        for name in ("mlx", "mlx.core", "mlx_lm"):
            importlib.import_module(name)
    except ImportError as e:
        err = MissingDependencyError("mlx and mlx-lm", "mlx", "the MLX backend")
        err.hint = (
            "pip install 'swallowctl[mlx]' (Apple Silicon; on Linux it installs mlx[cpu], "
            "CPU only); or use --backend torch"
        )
        raise err from e


class MlxBackend:
    """An mlx-lm model and tokenizer wrapper, stopping on every stop id of the model."""

    name: BackendName = "mlx"

    def __init__(self, model: Any, tokenizer: Any, resolved: ResolvedModel) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = resolved.name
        self.stop_token_ids = resolved.stop_token_ids

    @classmethod
    def load(
        cls, resolved: ResolvedModel, load_id: str, *, adapter: AdapterInfo | None = None
    ) -> MlxBackend:
        """`mlx_lm.load` the model (its MLX twin, a converted export, or the HF folder).

        Raises:
            MissingDependencyError: mlx or mlx-lm is not installed.
            RuntimeFailure: mlx-lm could not load the model or the adapter.
        """
        require_mlx()
        from mlx_lm import load

        adapter_path = None
        if adapter is not None:
            adapter_path = adapter.path
            if adapter.format == "peft":
                adapter_path = cached_mlx_adapter(adapter.path, resolved.architecture)
        # The commit pins the bf16 base; an MLX twin is another repo with its own history.
        revision = resolved.revision if load_id == resolved.model_id else None
        log.info("loading %s with mlx-lm", load_id)
        try:
            loaded = load(
                load_id,
                adapter_path=str(adapter_path) if adapter_path else None,
                revision=revision,
            )
            model, tokenizer = loaded[0], loaded[1]
        except (OSError, ValueError, KeyError) as e:
            text = str(e).strip().strip('"') or type(e).__name__
            raise RuntimeFailure(
                f"mlx-lm could not load {load_id}: {text.splitlines()[0]}",
                hint=f"fetch it once with 'swallowctl download --mlx {resolved.name}', or pass "
                "--model (an MLX folder from 'swallowctl export --format mlx', an HF folder)",
            ) from e
        # mlx-lm stops on config.json's eos ids plus the tokenizer's; Llama-3.1 checkpoints often
        # list only <|eot_id|> in one of them, and then an <|eom_id|> would run on.
        for token_id in resolved.stop_token_ids:
            tokenizer.add_eos_token(str(token_id))
        return cls(model, tokenizer, resolved)

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """Chat template rendered to text and encoded without a second BOS (as on torch)."""
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Teacher-forced next-token logits for every position, float32."""
        import mlx.core as mx
        import numpy as np

        out = self.model(mx.array(token_ids)[None])
        return np.array(out[0].astype(mx.float32))

    def stream_generate(
        self, messages: list[Message], settings: GenerationSettings
    ) -> Iterator[Response]:
        """Stream one answer: a response per token, then one with the finish reason."""
        return self.stream_ids(self.prompt_ids(messages), settings)

    def stream_ids(self, prompt: list[int], settings: GenerationSettings) -> Iterator[Response]:
        """`stream_generate` from token ids, mapped onto our `Response`.

        mlx-lm's last response carries the stop token (never part of the text) when it stopped,
        or the final real token when it hit the limit; every earlier one carries a real token.
        Every id in `tokenizer.eos_token_ids` stops it (all the model's stop ids, see `load`).
        """
        import mlx.core as mx
        from mlx_lm import stream_generate

        if settings.seed is not None:
            mx.random.seed(settings.seed)
        sampler = make_mlx_sampler(settings)
        stream = stream_generate(
            self.model,
            self.tokenizer,
            prompt=prompt,
            max_tokens=settings.max_new_tokens,
            sampler=sampler,
        )
        # Text comes from our decoder, not mlx-lm's: its BPE detokenizer drops an answer's
        # leading space, so the same tokens would read differently on the two backends.
        decoder = IncrementalDecoder(self.tokenizer)
        for count, r in enumerate(stream, start=1):
            tps, peak = r.generation_tps, r.peak_memory
            if r.finish_reason == "stop":  # r.token is the stop token: not part of the answer
                yield Response(decoder.flush(), None, count - 1, tps, peak, "stop")
                return
            text = decoder.add(r.token)
            if r.finish_reason == "length":
                text += decoder.flush()
            yield Response(text, r.token, count, tps, peak, "length" if r.finish_reason else None)

    def generate_batch(
        self, batch: list[list[Message]], settings: GenerationSettings
    ) -> list[Completion]:
        """One conversation after another: on a Mac one stream already uses the whole chip."""
        return [collect(self.stream_generate(m, settings)) for m in batch]


def make_mlx_sampler(settings: GenerationSettings) -> Any:
    """mlx-lm's sampler for `settings`, warping in transformers' order.

    mlx-lm cuts the nucleus (top_p, min_p, top_k) on untempered probabilities and applies the
    temperature afterwards; transformers and our torch loop divide by the temperature first. At
    0.7 / 0.9 that makes mlx-lm's nucleus about 2.5x wider. Dividing first and sampling at
    temperature 1 gives both backends the same distribution.
    """
    from mlx_lm.sample_utils import make_sampler

    if settings.is_greedy:
        return make_sampler(temp=0.0)
    tempered = make_sampler(
        temp=1.0, top_p=settings.top_p, min_p=settings.min_p, top_k=settings.top_k
    )
    inverse = 1.0 / settings.temperature

    def sampler(logprobs: Any) -> Any:
        return tempered(logprobs * inverse)

    return sampler


# --- peft adapters, converted once ------------------------------------------------------------


def cache_dir() -> Path:
    """`$SWALLOWCTL_CACHE/mlx-adapters` (default `~/.cache/swallowctl/mlx-adapters`)."""
    from swallowctl.core.tiny import cache_root

    return cache_root() / "mlx-adapters"


def adapter_hash(adapter_dir: Path, num_layers: int) -> str:
    """Hash of the adapter's weights and config (and how we convert them)."""
    digest = hashlib.sha256(f"v{CONVERTER_VERSION} layers={num_layers}\0".encode())
    for name in (PEFT_CONFIG, PEFT_WEIGHTS):
        with (adapter_dir / name).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def cached_mlx_adapter(adapter_dir: Path, architecture: Any) -> Path:
    """The peft adapter in mlx-lm's format, converted on first use and reused after."""
    from swallowctl.export import peft_to_mlx_adapter

    layers = int(architecture.num_hidden_layers)
    target = cache_dir() / adapter_hash(adapter_dir, layers)
    if (target / "adapter_config.json").is_file():
        log.debug("reusing converted adapter %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        peft_to_mlx_adapter(adapter_dir, tmp, num_layers=layers)
        with contextlib.suppress(OSError):  # another process won the race: use its copy
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted the peft adapter for MLX into %s", target)
    return target


def convert_to_mlx(
    hf_dir: Path, out_dir: Path, *, quantize: bool, q_bits: int, q_group_size: int
) -> None:
    """`mlx_lm.convert` a merged HF folder into `out_dir` (which must not exist yet).

    mlx-lm prints its progress on stdout; it is sent to stderr, where progress belongs.
    """
    require_mlx()
    from mlx_lm import convert

    with contextlib.redirect_stdout(sys.stderr):
        convert(
            str(hf_dir),
            mlx_path=str(out_dir),
            quantize=quantize,
            q_bits=q_bits if quantize else None,
            q_group_size=q_group_size if quantize else None,
        )
