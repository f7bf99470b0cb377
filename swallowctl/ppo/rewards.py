"""Rewards: built-in functions, user functions, a reward model, an HTTP endpoint, and their sum.

Every component has TRL's GRPO reward signature::

    def my_reward(prompts: list[str], completions: list[str], completion_ids: list[list[int]],
                  **kwargs) -> list[float | None]: ...

and is called once per batch with these keyword arguments besides the three lists:
- every dataset column, as a list with one value per sample (`messages` included: the chat the
  policy was prompted with);
- `finished: list[bool]`: the completion ended on a stop token (False: cut at max_new_tokens);
- `mode: str`: the name of the mode the prompts were rendered with;
- the component's own `kwargs:` from the config.
Like TRL, a function must accept `**kwargs`: columns come and go with the data set.
Return one value per sample; `None` means "not applicable to this sample".

`RewardSet` calls the components concurrently (they may be slow LLM or HTTP calls), each with its
`timeout_s` and `retries`, and adds them up with their weights. A retry calls the function again:
give `retries: 0` to a function with side effects.

Only the standard library is imported here at module level; torch and transformers are imported
when a `RewardModel` is built.
"""

from __future__ import annotations

import base64
import concurrent.futures
import difflib
import inspect
import json
import logging
import math
import os
import re
import threading
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from swallowctl.core.config import RewardSpec
from swallowctl.core.errors import ConfigError, DataError, RuntimeFailure, SwallowError
from swallowctl.core.modes import BUILTIN_MODES, ModeSpec
from swallowctl.core.userimport import import_attr
from swallowctl.ppo.data import RESERVED_COLUMNS

log = logging.getLogger(__name__)

RewardFunction = Callable[..., Sequence[float | None]]

# --- characters ---------------------------------------------------------------------------------

# Code point ranges counted as Japanese script by `japanese_ratio`.
_JAPANESE_RANGES: tuple[tuple[int, int], ...] = (
    (0x3000, 0x303F),  # CJK symbols and punctuation: 、。「」『』〜々〆
    (0x3040, 0x309F),  # hiragana
    (0x30A0, 0x30FF),  # katakana, with ー and ・
    (0x31F0, 0x31FF),  # katakana phonetic extensions (small ㇰ...)
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs (kanji)
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF01, 0xFF0F),  # full-width punctuation ！（），．／
    (0xFF1A, 0xFF20),  # full-width ：；？
    (0xFF3B, 0xFF40),  # full-width ［＼］
    (0xFF5B, 0xFF65),  # full-width ｛｜｝～ and half-width ｡｢｣､･
    (0xFF66, 0xFF9F),  # half-width katakana
    (0x20000, 0x3134F),  # CJK extensions B-G (rare kanji)
)


def is_japanese_char(ch: str) -> bool:
    """True for hiragana, katakana, kanji and Japanese (full-width) punctuation."""
    o = ord(ch)
    return any(lo <= o <= hi for lo, hi in _JAPANESE_RANGES)


# --- built-in reward functions ------------------------------------------------------------------


def japanese_ratio(
    prompts: list[str],
    completions: list[str],
    completion_ids: list[list[int]] | None = None,
    *,
    ignore_digits: bool = False,
    **kwargs: Any,
) -> list[float | None]:
    """Share of Japanese script among the non-space characters of each completion, in [0, 1].

    Japanese script: hiragana, katakana, kanji, Japanese and full-width punctuation. Latin
    letters, digits, ASCII punctuation and emoji count against it. An answer with no non-space
    characters scores 0. `ignore_digits: true` leaves digits out of the count (for answers full of
    dates and prices). Keeps a Japanese assistant from drifting into English.
    """
    out: list[float | None] = []
    for text in completions:
        chars = [c for c in text if not c.isspace() and not (ignore_digits and c.isdigit())]
        out.append(sum(map(is_japanese_char, chars)) / len(chars) if chars else 0.0)
    return out


_TERMINATORS = "。！？!?．"
_SENTENCE_SPLIT = re.compile(r"(?<=[。！？!?．])")
_CLOSERS = "」』）)】〉》\"'”’"
_TRAILING = _TERMINATORS + _CLOSERS + "…‥・、,〜~ー"
_PARTICLES = ("よね", "かね", "か", "ね", "よ")
_POLITE_ENDINGS = (
    "です",
    "ます",
    "ました",
    "でした",
    "ません",
    "でしょう",
    "ましょう",
    "ください",
    "下さい",
    "ませ",
)
_LIST_MARKER = re.compile(r"^\s*([・\-*•#>|]|\d+[.)．、]|[①-⑳])")


def _has_japanese_words(text: str) -> bool:
    return any(is_japanese_char(c) and not unicodedata.category(c).startswith("P") for c in text)


def is_polite_sentence(sentence: str) -> bool:
    """True when a sentence ends in the desu/masu register (です, ます, ました, ください ...).

    Closing brackets, trailing punctuation and one sentence-final particle (か, ね, よ, よね, かね)
    are looked through: 「何ですか？」 and 「そうですよね。」 are polite.
    """
    s = sentence.strip().rstrip(_TRAILING + " \u3000")
    for p in _PARTICLES:
        if s.endswith(p):
            s = s[: -len(p)]
            break
    return s.endswith(_POLITE_ENDINGS)


def _sentences(text: str) -> list[str]:
    """The sentences `polite` judges.

    A sentence ends at 。！？ (or !?). Unterminated lines (headings, list items, code) are
    skipped, except the text's last piece, which an answer often leaves without 。.
    """
    pieces: list[tuple[str, bool]] = []  # (piece, terminated)
    for line in text.splitlines():
        for piece in _SENTENCE_SPLIT.split(line):
            core = piece.strip().rstrip(_CLOSERS)
            if core and _has_japanese_words(piece):
                pieces.append((piece.strip(), core[-1] in _TERMINATORS))
    out = [p for i, (p, terminated) in enumerate(pieces) if terminated or i == len(pieces) - 1]
    # A last piece that is a list item or heading is not a sentence either.
    if pieces and not pieces[-1][1] and _LIST_MARKER.match(pieces[-1][0]):
        out = out[:-1]
    return out


def polite(
    prompts: list[str],
    completions: list[str],
    completion_ids: list[list[int]] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """Share of sentences in the desu/masu (です・ます) register, in [0, 1].

    A sentence counts as polite when it ends in です, ます, ました, でした, ません, でしょう,
    ましょう, ください or ませ (before 。！？, closing brackets and a final か/ね/よ). Lines without
    a sentence end (headings, bullet items) are not judged; a completion with no Japanese
    sentence scores 0. 「はい、承知しました。」 scores 1; 「晴れだ。雨です。」 scores 0.5.
    """
    out: list[float | None] = []
    for text in completions:
        sentences = _sentences(text)
        out.append(sum(map(is_polite_sentence, sentences)) / len(sentences) if sentences else 0.0)
    return out


def length_window(
    prompts: list[str],
    completions: list[str],
    completion_ids: list[list[int]] | None = None,
    *,
    min_chars: int = 20,
    max_chars: int = 400,
    **kwargs: Any,
) -> list[float | None]:
    """1 when a completion's length (characters, outer whitespace stripped) is in the window.

    Below `min_chars` it falls linearly to 0 at an empty answer (`n / min_chars`); above
    `max_chars` it falls linearly to 0 at twice `max_chars` (`1 - (n - max) / max`). Range [0, 1].
    Set the window with the component's `kwargs: {min_chars: ..., max_chars: ...}`.
    """
    if min_chars < 0 or max_chars <= 0 or min_chars > max_chars:
        raise ValueError(
            f"length_window needs 0 <= min_chars <= max_chars and max_chars > 0 "
            f"(got min_chars={min_chars}, max_chars={max_chars})"
        )
    out: list[float | None] = []
    for text in completions:
        n = len(text.strip())
        if n < min_chars:
            out.append(n / min_chars)
        elif n > max_chars:
            out.append(max(0.0, 1.0 - (n - max_chars) / max_chars))
        else:
            out.append(1.0)
    return out


def repetition_penalty(
    prompts: list[str],
    completions: list[str],
    completion_ids: list[list[int]] | None = None,
    *,
    n: int = 6,
    unit: str = "char",
    **kwargs: Any,
) -> list[float | None]:
    """`-(1 - distinct n-grams / all n-grams)`: 0 without repeats, toward -1 for a looping answer.

    `unit: char` (default) counts character n-grams after collapsing whitespace, which works for
    Japanese without a word splitter; `unit: token` counts token-id n-grams of `completion_ids`.
    A completion shorter than `n` scores 0. Range (-1, 0].
    """
    if n <= 0:
        raise ValueError(f"repetition_penalty needs n >= 1 (got n={n})")
    if unit not in ("char", "token"):
        raise ValueError(f"repetition_penalty unit must be 'char' or 'token' (got {unit!r})")
    if unit == "token" and completion_ids is None:
        raise ValueError("repetition_penalty with unit 'token' needs completion_ids")
    out: list[float | None] = []
    for i, text in enumerate(completions):
        units: Sequence[Any]
        if unit == "token":
            assert completion_ids is not None
            units = completion_ids[i]
        else:
            units = " ".join(text.split())
        grams = [tuple(units[j : j + n]) for j in range(len(units) - n + 1)]
        out.append(-(1.0 - len(set(grams)) / len(grams)) if grams else 0.0)
    return out


def parse_choice(text: str, choices: Mapping[str, Any] | Sequence[str]) -> str | None:
    """The choice a completion answers with, or None when it is not a clean answer.

    After stripping whitespace (and reading full-width digits such as 「１」 as ASCII) the text must
    start with one of `choices` (keys, for a mapping), followed by nothing, a newline, punctuation
    or a special token: "1", "１", "2。", "3\\n理由..." parse; "12", "1 番", "答え: 1", "" do not.
    The longest matching choice wins, so "10" is not read as "1".
    """
    t = unicodedata.normalize("NFKC", text.strip())
    keys = sorted((str(k) for k in choices), key=len, reverse=True)
    for key in keys:
        nkey = unicodedata.normalize("NFKC", key)
        if not nkey or not t.startswith(nkey):
            continue
        rest = t[len(nkey) :]
        if not rest or rest[0] in "\r\n" or rest.startswith("<|"):
            return key
        if unicodedata.category(rest[0]).startswith("P"):
            return key
    return None


def format_eos(
    prompts: list[str],
    completions: list[str],
    completion_ids: list[list[int]] | None = None,
    *,
    finished: Sequence[bool] | None = None,
    choices: Mapping[str, Any] | Sequence[str] | None = None,
    output_error_penalty: float = -1.0,
    **kwargs: Any,
) -> list[float | None]:
    """Did the answer end properly, in the format the mode asks for?

    Free-text mode (no `choices`): 1 when the completion ended on a stop token, else 0.
    Choice mode (the mode's `choices`, filled in by RewardSet): `output_error_penalty` (the mode's,
    -1 by default) when the text does not parse to a choice (see `parse_choice`); else 1 when it
    ended on a stop token, 0 when it was cut off. Range [min(penalty, 0), 1].
    Without `finished`, every completion is taken as finished.
    """
    done = [True] * len(completions) if finished is None else list(finished)
    out: list[float | None] = []
    for text, ended in zip(completions, done, strict=True):
        if choices is not None and parse_choice(text, choices) is None:
            out.append(float(output_error_penalty))
        else:
            out.append(1.0 if ended else 0.0)
    return out


BUILTIN_REWARDS: dict[str, RewardFunction] = {
    "japanese_ratio": japanese_ratio,
    "polite": polite,
    "length_window": length_window,
    "repetition_penalty": repetition_penalty,
    "format_eos": format_eos,
}

# Arguments RewardSet fills in from the mode for these built-ins (unless the config sets them).
_MODE_FILLED: dict[RewardFunction, tuple[str, ...]] = {
    format_eos: ("choices", "output_error_penalty"),
}


# --- loading user functions ---------------------------------------------------------------------


def load_reward_function(spec: str, *, index: int | None = None) -> RewardFunction:
    """A built-in reward by name, or `package.module:function` from the user's code.

    Only the named module is imported (with its parent packages, as Python does); nothing is
    scanned. The current directory is searched after sys.path, as `python -m` would, so a
    `my_rewards.py` beside the config works. `index` only labels messages (`rewards[i]`).

    Raises:
        ConfigError: unknown built-in, module not found or failing to import, missing attribute,
            something that is not a function.
    """
    where = f"rewards[{index}].function" if index is not None else "reward function"
    spec = spec.strip()
    if ":" not in spec:
        if spec in BUILTIN_REWARDS:
            return BUILTIN_REWARDS[spec]
        guess = difflib.get_close_matches(spec, list(BUILTIN_REWARDS), n=1)
        tip = f"did you mean '{guess[0]}'? " if guess else ""
        raise ConfigError(
            f"{where}: unknown built-in reward '{spec}'",
            hint=f"{tip}built-ins: {', '.join(BUILTIN_REWARDS)}; or give package.module:function",
        )
    obj = import_attr(
        spec, where=where, kind="function", example="my_rewards:score for score() in my_rewards.py"
    )
    if inspect.isclass(obj) or not callable(obj):
        kind = "a class" if inspect.isclass(obj) else f"a {type(obj).__name__}"
        raise ConfigError(
            f"{where}: '{spec}' is {kind}, not a function",
            hint="name a function f(prompts, completions, completion_ids, **kwargs)",
        )
    return obj


def _check_kwargs(fn: RewardFunction, kwargs: Mapping[str, Any], where: str) -> None:
    """Built-ins: reject unknown/invalid settings now. User functions: must take **kwargs."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a C function or odd callable: nothing to check
    if fn in BUILTIN_REWARDS.values():
        own = [
            p.name
            for p in sig.parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name != "finished"
        ]
        unknown = [k for k in kwargs if k not in own]
        if unknown:
            takes = f"it takes {', '.join(own)}" if own else "it takes no settings"
            raise ConfigError(f"{where}: {fn.__name__} does not take '{unknown[0]}'; {takes}")
        try:
            fn([], [], [], **kwargs)  # the built-ins check their settings on any call
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        return
    if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        raise ConfigError(
            f"{where}: {getattr(fn, '__name__', fn)!s} must accept **kwargs",
            hint="it receives every dataset column, finished= and mode= as keyword arguments",
        )


# --- a reward model -----------------------------------------------------------------------------


class RewardModel:
    """A sequence-classification reward model (one label), with its own tokenizer.

    Each sample is scored as the conversation `messages + [assistant: completion]`, laid out by the
    reward model's own chat template (plain `prompt\\ncompletion` text when it has none), so the
    policy and the reward model need not share a tokenizer. Texts longer than the model's context
    are cut from the left: the completion's end is what it must see. Weights load from safetensors
    only, without remote code; 4-bit (bitsandbytes NF4) only when asked.
    """

    def __init__(
        self,
        name_or_path: str,
        *,
        device: Any = "cpu",  # a str or torch.device
        load_in_4bit: bool = False,
        batch_size: int = 8,
        max_length: int | None = None,
        revision: str | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from swallowctl.core.models import resolve

        resolved = resolve(name_or_path, revision)
        self.__name__ = name_or_path
        self.name = name_or_path
        self.device = torch.device(device)
        self.batch_size = batch_size
        load: dict[str, Any] = {
            "revision": resolved.revision,
            "trust_remote_code": False,
        }
        try:
            tokenizer = AutoTokenizer.from_pretrained(resolved.model_id, **load)
            dtype = _model_dtype(self.device)
            if load_in_4bit:
                from transformers import BitsAndBytesConfig

                quant = BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type="nf4",
                    bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=dtype,
                )
                model = AutoModelForSequenceClassification.from_pretrained(
                    resolved.model_id,
                    quantization_config=quant,
                    device_map={"": self.device},
                    dtype=dtype,
                    use_safetensors=True,
                    **load,
                )
            else:
                model = AutoModelForSequenceClassification.from_pretrained(
                    resolved.model_id, dtype=dtype, use_safetensors=True, **load
                ).to(self.device)
        except (OSError, ValueError) as e:
            raise RuntimeFailure(
                f"cannot load reward model '{name_or_path}': {e}",
                hint="it needs safetensors weights and a sequence-classification head",
            ) from None
        if model.config.num_labels != 1:
            raise ConfigError(
                f"reward model '{name_or_path}' has {model.config.num_labels} labels; "
                "a reward model gives one score (num_labels=1)"
            )
        if tokenizer.pad_token is None:
            # Batching needs a pad id; the model finds each row's last real token through it.
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "left"
        limit = min(
            tokenizer.model_max_length or 10**9,
            getattr(model.config, "max_position_embeddings", None) or 10**9,
        )
        self.max_length = max_length or (limit if limit < 10**9 else 4096)
        self.tokenizer = tokenizer
        self.model = model.eval()
        self._templated = bool(getattr(tokenizer, "chat_template", None))

    def text(
        self, messages: Sequence[Mapping[str, str]] | None, prompt: str, completion: str
    ) -> str:
        """The exact text the model scores for one sample."""
        if messages is None:
            messages = [{"role": "user", "content": prompt}]
        convo = [{"role": m["role"], "content": m["content"]} for m in messages]
        convo.append({"role": "assistant", "content": completion})
        if self._templated:
            return str(self.tokenizer.apply_chat_template(convo, tokenize=False))
        return "\n".join(m["content"] for m in convo)

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        completion_ids: list[list[int]] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        """One score per sample (uses the `messages` column when given, else the prompt text)."""
        import torch

        messages = kwargs.get("messages") or [None] * len(completions)
        texts = [self.text(m, p, c) for m, p, c in zip(messages, prompts, completions, strict=True)]
        out: list[float | None] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
                # The chat template already wrote BOS; a second one would shift every score.
                add_special_tokens=not self._templated,
            ).to(self.device)
            with torch.inference_mode():
                logits = self.model(**enc).logits
            out.extend(float(v) for v in logits[:, 0].float().cpu())
        return out


def _model_dtype(device: Any) -> Any:
    import torch

    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# --- an HTTP endpoint ---------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """The URL without user:password and query values, for messages and labels."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # IPv6 literal
    try:
        port = parts.port
    except ValueError:  # a malformed port: show none rather than fail while reporting
        port = None
    if port:
        host = f"{host}:{port}"
    query = "&".join(f"{k}=..." for k, _ in urllib.parse.parse_qsl(parts.query))
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, query, ""))


class HttpReward:
    """A reward computed by an HTTP endpoint.

    Contract: for each batch, one `POST url` with `Content-Type: application/json` and the body
    `{"prompts": [...], "completions": [...], "completion_ids": [[...]], "finished": [...],
    "mode": "...", <each dataset column>: [...], <each extra field>: ...}`. The answer must be
    `200` with `{"rewards": [number | null, ...]}`, one value per completion (null: not
    applicable). Connection errors, timeouts, 429 and 5xx are retried `retries` times with
    exponential backoff; other 4xx and malformed answers fail at once. Messages name the URL
    without credentials or query values; a bearer token is read from the environment variable
    `token_env` and never logged.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 30.0,
        retries: int = 2,
        headers: Mapping[str, str] | None = None,
        token_env: str | None = None,
        extra: Mapping[str, Any] | None = None,
        backoff_s: float = 0.5,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"reward url '{redact_url(url)}' is not an http(s) URL")
        self.shown = redact_url(url)
        auth: dict[str, str] = {}
        if parts.username is not None:
            # urllib cannot send user:password@ itself: move it into a Basic auth header.
            pair = f"{urllib.parse.unquote(parts.username)}:"
            pair += urllib.parse.unquote(parts.password or "")
            auth["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
            host = parts.hostname or ""
            netloc = f"[{host}]" if ":" in host else host
            netloc += f":{parts.port}" if parts.port else ""
            url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
        self.url = url
        self.__name__ = self.shown
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.extra = dict(extra or {})
        self.headers = {"Content-Type": "application/json", **auth, **dict(headers or {})}
        if token_env is not None:
            token = os.environ.get(token_env)
            if not token:
                raise ConfigError(f"reward url {self.shown}: ${token_env} is not set")
            self.headers["Authorization"] = f"Bearer {token}"

    @property
    def deadline_s(self) -> float:
        """The longest one call can take, every retry and backoff included."""
        backoff = sum(min(self.backoff_s * 2**k, 10.0) for k in range(self.retries))
        return self.timeout_s * (self.retries + 1) + backoff + 1.0

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        completion_ids: list[list[int]] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        """POST the batch and return the endpoint's rewards."""
        body = {
            **self.extra,
            **kwargs,
            "prompts": prompts,
            "completions": completions,
            "completion_ids": completion_ids,
        }
        # default=str: a Hub dataset column may hold dates or other non-JSON values.
        data = json.dumps(body, ensure_ascii=False, default=str).encode("utf-8")
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 10.0))
            request = urllib.request.Request(self.url, data=data, headers=self.headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = response.read()
            except urllib.error.HTTPError as e:
                snippet = e.read(200).decode("utf-8", "replace").strip()
                last = f"HTTP {e.code}" + (f": {snippet}" if snippet else "")
                if e.code != 429 and e.code < 500:
                    raise RuntimeFailure(f"reward url {self.shown} answered {last}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                reason = getattr(e, "reason", e)
                last = f"{type(reason).__name__}: {reason}"
            else:
                return self._parse(payload, len(completions))
            log.warning("reward url %s: %s (attempt %d)", self.shown, last, attempt + 1)
        raise RuntimeFailure(
            f"reward url {self.shown} failed after {self.retries + 1} attempt(s): {last}"
        )

    def _parse(self, payload: bytes, n: int) -> list[float | None]:
        try:
            answer = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            text = payload[:200].decode("utf-8", "replace")
            raise RuntimeFailure(f"reward url {self.shown} answered non-JSON: {text!r}") from None
        rewards = answer.get("rewards") if isinstance(answer, dict) else None
        if not isinstance(rewards, list):
            raise RuntimeFailure(
                f"reward url {self.shown} answered without a 'rewards' list",
                hint='the endpoint must answer {"rewards": [number or null, ...]}',
            )
        if len(rewards) != n:
            raise RuntimeFailure(
                f"reward url {self.shown} returned {len(rewards)} rewards for {n} completions"
            )
        return rewards


# --- the weighted sum ---------------------------------------------------------------------------


@dataclass
class RewardComponent:
    """One term of the reward: a callable with the GRPO signature, its weight and its limits."""

    label: str
    fn: RewardFunction
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 30.0
    retries: int = 2
    index: int | None = None  # position in the config's `rewards:` list, for messages

    @property
    def where(self) -> str:
        return (
            f"rewards[{self.index}] '{self.label}'" if self.index is not None else repr(self.label)
        )


@dataclass
class RewardResult:
    """Rewards of one batch.

    `total[i]` is the weighted sum over components for sample i, where a component's None ("not
    applicable") adds 0. `components[label]` holds that component's raw (unweighted) values with
    None kept as NaN, so per-component means can skip them. `seconds[label]` is its wall time.
    """

    total: list[float]
    components: dict[str, list[float]]
    seconds: dict[str, float] = field(default_factory=dict)

    def means(self) -> dict[str, float]:
        """Mean of each component over the samples it applied to (NaN if none)."""
        out: dict[str, float] = {}
        for label, values in self.components.items():
            real = [v for v in values if not math.isnan(v)]
            out[label] = sum(real) / len(real) if real else math.nan
        return out


def default_reward_specs(mode: ModeSpec) -> list[RewardSpec]:
    """What an empty `rewards:` means.

    A choice mode (e.g. intervention): `format_eos` alone (an answer that parses to a choice and
    stops). A free-text mode (chat): `format_eos` + `japanese_ratio` + `repetition_penalty`
    (stop properly, answer in Japanese, do not loop), weight 1 each.
    """
    if mode.choices:
        return [RewardSpec(function="format_eos")]
    return [
        RewardSpec(function="format_eos"),
        RewardSpec(function="japanese_ratio"),
        RewardSpec(function="repetition_penalty"),
    ]


def _label(spec: RewardSpec) -> str:
    if spec.name:
        return spec.name
    return spec.function or spec.model or redact_url(spec.url or "reward")


_MODEL_SETTINGS = ("batch_size", "max_length", "revision")
_URL_SETTINGS = ("headers", "token_env")


def check_reward_specs(specs: Sequence[RewardSpec]) -> None:
    """Check the `rewards:` list without loading any model: labels, functions, settings, URLs.

    Raises ConfigError naming `rewards[i]`. Call it before loading the policy, so a typo costs
    seconds, not a model load.
    """
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        label = _label(spec)
        if label in seen:
            raise ConfigError(
                f"rewards[{i}]: label '{label}' is also rewards[{seen[label]}]'s",
                hint="give one of them a name: (labels key the logged metrics)",
            )
        seen[label] = i
        where = f"rewards[{i}]"
        if spec.function:
            fn = load_reward_function(spec.function, index=i)
            _check_kwargs(fn, spec.kwargs, where)
        elif spec.model:
            unknown = [k for k in spec.kwargs if k not in _MODEL_SETTINGS]
            if unknown:
                raise ConfigError(
                    f"{where}: a reward model does not take '{unknown[0]}'; "
                    f"it takes {', '.join(_MODEL_SETTINGS)}"
                )
        elif spec.url:
            parts = urllib.parse.urlsplit(spec.url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ConfigError(f"{where}: url '{redact_url(spec.url)}' is not an http(s) URL")


class RewardSet:
    """The reward of a run: components called concurrently, once per batch, and summed.

    Each call runs every component in its own worker thread with its `timeout_s` per attempt and
    `retries` more attempts (backoff `backoff_s`, doubling). A component that still fails raises
    RuntimeFailure naming it; one returning the wrong number of values, or a value that is not a
    finite number or None, raises at once (a bug, not a hiccup: no retry). A timed-out attempt
    cannot be killed in Python: it finishes in the background and its result is dropped.
    """

    def __init__(
        self,
        components: Sequence[RewardComponent],
        *,
        modes: Mapping[str, ModeSpec] | None = None,
        run_mode: ModeSpec | None = None,
        stop_token_ids: Sequence[int] = (),
        backoff_s: float = 0.5,
    ) -> None:
        if not components:
            raise ValueError("a RewardSet needs at least one component")
        labels = [c.label for c in components]
        if len(set(labels)) != len(labels):
            raise ValueError(f"reward labels must be unique, got {labels}")
        self.components = list(components)
        self.modes = {**BUILTIN_MODES, **dict(modes or {})}
        self._user_modes = dict(modes or {})
        self.run_mode = run_mode
        self.stop_token_ids = frozenset(stop_token_ids)
        self.backoff_s = backoff_s
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=len(self.components), thread_name_prefix="reward"
        )

    @classmethod
    def from_config(
        cls,
        specs: Sequence[RewardSpec],
        *,
        device: Any = "cpu",
        load_in_4bit: bool = False,
        stop_token_ids: Sequence[int] = (),
        modes: Mapping[str, ModeSpec] | None = None,
        mode: str | ModeSpec = "chat",
    ) -> RewardSet:
        """Build the set from the config's `rewards:` (the defaults for `mode` when empty).

        Functions are imported and checked first, then reward models load (on `device`, a str or
        torch.device; 4-bit when `load_in_4bit`). `modes` are the config's own modes (built-ins
        are always known); `mode` is the run's mode, by name or as the spec (`cfg.mode()`).
        """
        all_modes = {**BUILTIN_MODES, **dict(modes or {})}
        if isinstance(mode, ModeSpec):
            run_mode = mode
        elif mode in all_modes:
            run_mode = all_modes[mode]
        else:
            raise ConfigError(f"data.mode: unknown mode '{mode}'")
        if not specs:
            specs = default_reward_specs(run_mode)
            log.info("no rewards: in the config; using %s", " + ".join(_label(s) for s in specs))
        check_reward_specs(specs)
        components: list[RewardComponent] = []
        for i, spec in enumerate(specs):
            fn: RewardFunction
            kwargs = dict(spec.kwargs)
            timeout_s, retries = spec.timeout_s, spec.retries
            try:
                if spec.function:
                    fn = load_reward_function(spec.function, index=i)
                elif spec.model:
                    fn = RewardModel(spec.model, device=device, load_in_4bit=load_in_4bit, **kwargs)
                    kwargs = {}
                else:
                    assert spec.url is not None
                    settings = {k: kwargs.pop(k) for k in _URL_SETTINGS if k in kwargs}
                    http = HttpReward(
                        spec.url,
                        timeout_s=spec.timeout_s,
                        retries=spec.retries,
                        extra=kwargs,
                        **settings,
                    )
                    # It retries by itself (only what is worth retrying); the set just bounds it.
                    fn, kwargs, timeout_s, retries = http, {}, http.deadline_s, 0
            except SwallowError as e:
                if not e.message.startswith("rewards["):
                    e.message = f"rewards[{i}]: {e.message}"
                    e.args = (e.message,)
                raise
            components.append(
                RewardComponent(
                    label=_label(spec),
                    fn=fn,
                    weight=spec.weight,
                    kwargs=kwargs,
                    timeout_s=timeout_s,
                    retries=retries,
                    index=i,
                )
            )
        return cls(components, modes=modes, run_mode=run_mode, stop_token_ids=stop_token_ids)

    @property
    def labels(self) -> list[str]:
        """Component labels, in config order (the metric names' suffixes)."""
        return [c.label for c in self.components]

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        completion_ids: Sequence[Sequence[int]],
        finished: Sequence[bool] | None = None,
        columns: Mapping[str, Sequence[Any]] | None = None,
        mode: str = "chat",
    ) -> RewardResult:
        """Score one batch: every component exactly once, concurrently; then the weighted sum.

        `finished` defaults to "the last completion id is a stop id" (needs `stop_token_ids`).
        `mode` is passed on to the functions; `format_eos` takes its choices from the config's
        mode of that name, else from the run's mode, else from the built-in of that name.

        Raises:
            RuntimeFailure: a component failed or timed out after its retries, or returned the
                wrong number of values or a value that is not a number or None.
            DataError: a column is named like one of the fixed arguments.
        """
        n = len(completions)
        columns = dict(columns or {})
        if finished is None:
            if not self.stop_token_ids:
                raise ValueError("pass finished= or give the RewardSet stop_token_ids")
            finished = [bool(ids) and ids[-1] in self.stop_token_ids for ids in completion_ids]
        for name, values in (
            ("prompts", prompts),
            ("completion_ids", completion_ids),
            ("finished", finished),
            *columns.items(),
        ):
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} values for {n} completions")
        clash = [k for k in columns if k in RESERVED_COLUMNS]
        if clash:
            raise DataError(f"column '{clash[0]}' clashes with a reward function argument")
        # The config's own modes by name first, then the run's mode (which may be a user mode the
        # set was not told the name of), then the built-ins.
        spec = self._user_modes.get(mode) or self.run_mode or BUILTIN_MODES.get(mode)
        futures = {
            self._pool.submit(
                self._run, c, prompts, completions, completion_ids, finished, columns, mode, spec
            ): c
            for c in self.components
        }
        done, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            # Report the first component in config order among those that failed so far.
            first = min(failed, key=lambda f: self.components.index(futures[f]))
            error = first.exception()
            assert error is not None
            raise error
        components: dict[str, list[float]] = {}
        seconds: dict[str, float] = {}
        for f, c in futures.items():
            components[c.label], seconds[c.label] = f.result()
        total = [0.0] * n
        for c in self.components:
            for i, v in enumerate(components[c.label]):
                if not math.isnan(v):
                    total[i] += c.weight * v
        return RewardResult(total=total, components=components, seconds=seconds)

    def _run(
        self,
        c: RewardComponent,
        prompts: Sequence[str],
        completions: Sequence[str],
        completion_ids: Sequence[Sequence[int]],
        finished: Sequence[bool],
        columns: Mapping[str, Sequence[Any]],
        mode: str,
        spec: ModeSpec | None,
    ) -> tuple[list[float], float]:
        """Call one component (with its retries) and check what it returned."""
        start = time.perf_counter()
        kwargs: dict[str, Any] = {k: list(v) for k, v in columns.items()}
        kwargs.update(c.kwargs)
        kwargs["finished"] = list(finished)
        kwargs["mode"] = mode
        if spec is not None:
            for name in _MODE_FILLED.get(c.fn, ()):
                kwargs.setdefault(name, getattr(spec, name))
        last: BaseException | None = None
        attempts = c.retries + 1
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 10.0))
            # Fresh copies per attempt: a function that edits its inputs cannot disturb another.
            args = (list(prompts), list(completions), [list(ids) for ids in completion_ids])
            try:
                raw = _call_with_timeout(c.fn, args, kwargs, c.timeout_s, c.label)
            except TimeoutError:
                last = TimeoutError(f"timed out after {c.timeout_s:g}s")
            except Exception as e:
                last = e
            else:
                return _as_floats(c, raw, len(completions)), time.perf_counter() - start
            log.warning("reward %s: attempt %d of %d: %s", c.where, attempt + 1, attempts, last)
        assert last is not None
        cause = last.message if isinstance(last, SwallowError) else f"{type(last).__name__}: {last}"
        if isinstance(last, TimeoutError):
            cause = str(last)
        raise RuntimeFailure(
            f"reward {c.where} failed after {attempts} attempt(s): {cause}",
            hint="raise its timeout_s or retries in the config, or fix the function"
            if isinstance(last, TimeoutError)
            else "run with --verbose for the traceback",
        ) from last

    def close(self) -> None:
        """Stop the worker threads (attempts still running finish in the background)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> RewardSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _call_with_timeout(
    fn: RewardFunction,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    timeout_s: float,
    label: str,
) -> Any:
    """Run `fn` in a daemon thread; raise TimeoutError if it takes longer than `timeout_s`.

    A daemon thread (not a pool worker) because a hung attempt must not hold a worker forever or
    block the interpreter from exiting.
    """
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=target, name=f"reward-{label}", daemon=True).start()
    if not done.wait(timeout_s):
        raise TimeoutError
    if "error" in box:
        raise box["error"]
    return box["value"]


def _as_floats(c: RewardComponent, raw: Any, n: int) -> list[float]:
    """Check a component's return value: n numbers or Nones; None becomes NaN."""
    try:
        values = list(raw)
    except TypeError:
        raise RuntimeFailure(
            f"reward {c.where} returned {type(raw).__name__}, not a list of {n} numbers"
        ) from None
    if len(values) != n:
        raise RuntimeFailure(
            f"reward {c.where} returned {len(values)} values for {n} completions",
            hint="return exactly one value (or None) per completion",
        )
    out: list[float] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
            continue
        if isinstance(v, str | bytes):  # float("0.5") would pass: a string is a bug upstream
            raise RuntimeFailure(
                f"reward {c.where} returned the string {v!r} for sample {i}; "
                "expected a number or None"
            )
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise RuntimeFailure(
                f"reward {c.where} returned {type(v).__name__} {v!r} for sample {i}; "
                "expected a number or None"
            ) from None
        if math.isinf(x):
            raise RuntimeFailure(f"reward {c.where} returned {x} for sample {i}")
        out.append(x)  # NaN passes through: it already means "no value" here
    return out
