"""PyTorch backend: the training stack's loaders, a peft adapter on top, our own token loop.

Loading reuses `ppo.policy` (4-bit NF4 on CUDA, bf16/fp32 elsewhere, safetensors only), so infer
sees the model exactly as training did. Streaming is a plain KV-cached loop instead of
`generate` + `TextIteratorStreamer`: no second thread, so Ctrl-C stops an answer at once and
leaves nothing running. Batches go through `generate` with left padding.

Imported only when the torch backend is opened: torch at module level is fine here.
"""

from __future__ import annotations

import inspect
import logging
import resource
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from swallowctl.core.errors import MissingDependencyError, RuntimeFailure
from swallowctl.infer import (
    AdapterInfo,
    BackendName,
    Completion,
    FinishReason,
    GenerationSettings,
    IncrementalDecoder,
    Message,
    Response,
    SpeedMeter,
)

if TYPE_CHECKING:
    from swallowctl.core.config import SwallowConfig
    from swallowctl.core.models import ResolvedModel

log = logging.getLogger(__name__)


def default_device() -> str:
    """CUDA when present, else CPU (MPS is left to the MLX backend on a Mac)."""
    return "cuda:0" if torch.cuda.is_available() else "cpu"


class TorchBackend:
    """A causal LM (optionally with a peft LoRA adapter) and its tokenizer."""

    name: BackendName = "torch"

    def __init__(self, model: Any, tokenizer: Any, resolved: ResolvedModel, device: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = resolved.name
        self.stop_token_ids = resolved.stop_token_ids
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.device = torch.device(device)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.config = base.config
        # transformers 5.2x renamed forward's `past_key_values` to `cache` (the old name warns
        # and goes away in 5.40); earlier 5.x releases know only the old one.
        params = inspect.signature(type(base).forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        # Our settings are the only source of sampling parameters: without this, generate()
        # would fill unset fields from the checkpoint's generation_config.json (a Hub file may
        # carry a repetition_penalty), and the batch path would sample differently from the
        # stream path.
        from transformers import GenerationConfig

        base.generation_config = GenerationConfig(  # peft's generate() reads the base's
            eos_token_id=list(self.stop_token_ids), pad_token_id=self.pad_token_id
        )

    @classmethod
    def load(
        cls,
        resolved: ResolvedModel,
        cfg: SwallowConfig,
        *,
        adapter: AdapterInfo | None = None,
        device: str | None = None,
    ) -> TorchBackend:
        """Load base (+ adapter) as training does: 4-bit on CUDA by default, fp32 on CPU."""
        from swallowctl.ppo.policy import decide_precision, load_base, load_tokenizer

        device = device or default_device()
        precision = decide_precision(cfg, device)
        log.info(
            "loading %s on %s (%s)",
            resolved.model_id,
            device,
            "4-bit NF4" if precision.load_in_4bit else precision.dtype,
        )
        try:
            tokenizer = load_tokenizer(resolved, cfg)
            model = load_base(resolved, cfg, precision)
        except OSError as e:  # transformers' "couldn't connect / not in the cache" and kin
            raise RuntimeFailure(
                f"could not load {resolved.model_id}: {_first_line(e)}",
                hint=f"fetch it once with 'swallowctl download {resolved.name}', or pass --model",
            ) from e
        if adapter is not None:
            model = apply_adapter(model, adapter)
        model.config.use_cache = True  # load_base turns it off for training forwards
        model.eval()
        return cls(model, tokenizer, resolved, device)

    # --- prompts and logits -------------------------------------------------------------------

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """Chat template rendered to text, then encoded without adding a second BOS.

        transformers 5 returns a BatchEncoding from `apply_chat_template(tokenize=True)`; going
        through text is the same on both backends, so their prompts match token for token.
        """
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Teacher-forced next-token logits for every position, float32 on the CPU."""
        ids = torch.tensor([token_ids], device=self.device)
        out = self.model(input_ids=ids, use_cache=False)
        return np.asarray(out.logits[0].float().cpu().numpy())

    # --- streaming ------------------------------------------------------------------------------

    def stream_generate(
        self, messages: list[Message], settings: GenerationSettings
    ) -> Iterator[Response]:
        """Stream one answer: a response per token, then one with the finish reason."""
        return self.stream_ids(self.prompt_ids(messages), settings)

    def stream_ids(self, prompt: list[int], settings: GenerationSettings) -> Iterator[Response]:
        """`stream_generate` from token ids (benchmarks and tests use it directly)."""
        decoder = IncrementalDecoder(self.tokenizer)
        meter = SpeedMeter()
        reason: FinishReason = "length"
        for token in self._tokens(prompt, settings):
            if token in self.stop_token_ids:
                reason = "stop"
                break
            rate = meter.tick()
            yield Response(decoder.add(token), token, meter.count, rate, self._peak_gb())
        yield Response(decoder.flush(), None, meter.count, meter.rate, self._peak_gb(), reason)

    @torch.inference_mode()  # on a generator torch re-enters the mode around every step
    def _tokens(self, prompt: list[int], settings: GenerationSettings) -> Iterator[int]:
        from transformers import DynamicCache

        generator = self._generator(settings.seed)
        ids = torch.tensor([prompt], device=self.device)
        # The cache fills in place; it is passed under whichever name this transformers uses.
        cache = {self._cache_arg: DynamicCache(config=self.config)}
        # logits_to_keep=1: the prompt pass needs the last position's logits only; a full
        # prompt x 128k-vocab fp32 tensor would be the biggest allocation of the whole answer.
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache)
        for _ in range(settings.max_new_tokens):
            next_id = _pick(out.logits[:, -1, :].float(), settings, generator)
            token = int(next_id.item())  # a device sync per token, as in any streaming loop
            yield token
            if token in self.stop_token_ids:
                return
            out = self.model(input_ids=next_id.view(1, 1), use_cache=True, **cache)

    def _generator(self, seed: int | None) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        return generator

    def _peak_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / (1e9 if sys.platform == "darwin" else 1e6)  # bytes on macOS, KiB on Linux

    # --- batches --------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate_batch(
        self, batch: list[list[Message]], settings: GenerationSettings
    ) -> list[Completion]:
        """Answer several conversations in one left-padded `generate` call."""
        import time

        prompts = [self.prompt_ids(m) for m in batch]
        width = max(len(p) for p in prompts)
        # Left padding: every prompt ends at the right edge, where generation continues.
        ids = [[self.pad_token_id] * (width - len(p)) + p for p in prompts]
        mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        start = time.perf_counter()
        out = self.model.generate(
            input_ids=torch.tensor(ids, device=self.device),
            attention_mask=torch.tensor(mask, device=self.device),
            generation_config=self._generation_config(settings),
        )
        elapsed = max(time.perf_counter() - start, 1e-9)
        rows = [self._completion(row[width:].tolist()) for row in out]
        rate = sum(len(c.token_ids) for c in rows) / elapsed
        for c in rows:
            c.tokens_per_s, c.peak_memory_gb = rate, self._peak_gb()
        return rows

    def _generation_config(self, settings: GenerationSettings) -> Any:
        from transformers import GenerationConfig

        # Fields left unset are filled from global defaults (top_k=50!), so sampling sets all of
        # them; greedy sets the neutral values transformers expects, or it warns on every call.
        sampling: dict[str, Any] = {"do_sample": False, "temperature": 1.0, "top_p": 1.0}
        if not settings.is_greedy:
            sampling = {"do_sample": True, "temperature": settings.temperature}
            sampling.update(
                top_p=settings.top_p, top_k=settings.top_k, min_p=settings.min_p or None
            )
        return GenerationConfig(
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=list(self.stop_token_ids),  # every stop id, not only the tokenizer's
            pad_token_id=self.pad_token_id,
            **sampling,
        )

    def _completion(self, ids: list[int]) -> Completion:
        stop = next((i for i, t in enumerate(ids) if t in self.stop_token_ids), None)
        kept = ids if stop is None else ids[:stop]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Completion(text, kept, "length" if stop is None else "stop", 0.0)


def apply_adapter(model: Any, adapter: AdapterInfo) -> Any:
    try:
        from peft import PeftModel
    except ImportError as e:
        raise MissingDependencyError("peft", "train", "a LoRA adapter on PyTorch") from e
    log.info("applying adapter %s", adapter.path)
    try:
        # read_adapter made sure adapter_model.safetensors exists, so peft never falls back to
        # unpickling adapter_model.bin.
        return PeftModel.from_pretrained(model, str(adapter.path), use_safetensors=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise RuntimeFailure(
            f"could not apply the adapter {adapter.path} to this model: {_first_line(e)}",
            hint="run it on the base it was trained on (see its manifest.json), or pass --model",
        ) from e


def _pick(logits: torch.Tensor, s: GenerationSettings, generator: torch.Generator) -> torch.Tensor:
    """The next token from [1, vocab] fp32 logits, warped in transformers' order.

    temperature -> top_k -> top_p -> min_p, as `generate` applies its warpers, so the stream and
    batch paths sample from the same distribution.
    """
    if s.is_greedy:
        return logits.argmax(dim=-1)
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:  # the smallest set of likeliest tokens with mass >= top_p (HF's TopP)
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        outside = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - s.top_p)
        outside[..., -1:] = False  # the likeliest token always stays
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    if s.min_p > 0.0:
        probs = logits.softmax(dim=-1)
        floor = s.min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).view(-1)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
