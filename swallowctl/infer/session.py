"""`swallowctl infer` around the backends: flags, modes, single answers and the chat REPL.

Modes decide the messages (system prompt, template) and, when they declare `choices`, how an
answer is read: greedy by default, parsed into one choice and its label. JSONL batches live in
`swallowctl.infer.batch`.
"""

from __future__ import annotations

import logging
import os
import select
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.text import Text

from swallowctl.core import console
from swallowctl.core.errors import SwallowError, UsageError
from swallowctl.core.modes import BUILTIN_MODES, ModeSpec
from swallowctl.infer import GenerationSettings, InferenceBackend, Message

if TYPE_CHECKING:
    from swallowctl.core.config import SwallowConfig

log = logging.getLogger(__name__)

PROMPT = ">>> "
NO_CHOICE = "no valid choice"


# --- flags, modes and settings -------------------------------------------------------------------


def check_flags(
    *,
    prompt: str | None,
    input_path: Path | None,
    output: Path | None,
    json_: bool,
    batch_size: int,
    limit: int | None,
    env: bool = False,
) -> None:
    """Flag combinations that cannot work, refused before anything loads.

    `env`: episodes inside an environment (--env / --episodes), whose --output is a steps file.
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be at least 1")
    if env:
        if prompt is not None or input_path is not None or limit is not None:
            raise UsageError(
                "--env plays episodes; it takes no --prompt, --input or --limit",
                hint="e.g. --env my_env:MyEnv --episodes 32 [--output steps.jsonl] [--json]",
            )
        return
    if prompt is not None and input_path is not None:
        raise UsageError("--prompt and --input both given; answer one prompt or a file")
    if (input_path is None) != (output is None):
        given, missing = ("--input", "--output") if output is None else ("--output", "--input")
        raise UsageError(
            f"{given} needs {missing}", hint="e.g. --input in.jsonl --output out.jsonl"
        )
    if json_ and prompt is None and input_path is None:
        raise UsageError("--json needs --prompt or --input; the chat is interactive")
    if limit is not None and (input_path is None or limit < 1):
        raise UsageError("--limit N (N >= 1) goes with --input")


def resolve_mode(cfg: SwallowConfig, name: str | None, system: str | None) -> ModeSpec:
    """The named mode (default `data.mode`), with `--system` replacing its system prompt."""
    name = name or cfg.data.mode
    known = {**BUILTIN_MODES, **cfg.modes}
    if name not in known:
        raise UsageError(
            f"unknown mode '{name}'", hint=f"modes: {', '.join(known)} (add more under modes:)"
        )
    mode = known[name]
    return mode if system is None else mode.model_copy(update={"system": system})


def resolve_settings(
    cfg: SwallowConfig,
    mode: ModeSpec,
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    max_new_tokens: int | None = None,
    greedy: bool = False,
    seed: int | None = None,
) -> GenerationSettings:
    """Flags > config `generation:` > the seed's defaults. A mode with choices is greedy unless
    --temperature or --top-p asks for sampling: a classifier should give the same answer twice.
    """
    if greedy and (temperature is not None or top_p is not None):
        raise UsageError("--greedy contradicts --temperature / --top-p; give one or the other")
    if temperature is not None and temperature < 0:
        raise UsageError(f"--temperature {temperature}: must be >= 0 (0 means greedy)")
    if top_p is not None and not 0 < top_p <= 1:
        raise UsageError(f"--top-p {top_p}: must be in (0, 1]")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    g = cfg.generation
    if g.typical_p != 1.0:
        log.warning("generation.typical_p applies to training rollouts only; infer ignores it")
    sampling_asked = temperature is not None or top_p is not None
    return GenerationSettings(
        temperature=g.temperature if temperature is None else temperature,
        top_p=g.top_p if top_p is None else top_p,
        top_k=g.top_k,
        min_p=g.min_p,
        max_new_tokens=max_new_tokens or g.max_new_tokens,
        greedy=greedy or (mode.choices is not None and not sampling_asked),
        seed=seed,
    )


def messages_for(text: str, mode: ModeSpec) -> list[Message]:
    """One prompt laid out by the mode (its system prompt and template)."""
    from swallowctl.ppo.data import render_messages

    return render_messages({"prompt": text}, mode, where="--prompt")


# --- single answers -----------------------------------------------------------------------------


@dataclass
class Answer:
    """One finished answer, and the choice it parses to when the mode has choices."""

    text: str
    tokens: int
    tokens_per_s: float
    finish_reason: str
    backend: str
    model: str
    choices: dict[str, str] | None = None
    choice: str | None = None

    @property
    def label(self) -> str | None:
        """The chosen strategy's label, e.g. 'validate'."""
        return self.choices[self.choice] if self.choices and self.choice else None

    def to_json(self) -> dict[str, Any]:
        """What `--json` prints: text, tokens, tokens/s, backend, model (+ choice, label)."""
        data: dict[str, Any] = {
            "text": self.text,
            "tokens": self.tokens,
            "tokens_per_s": round(self.tokens_per_s, 2),
            "finish_reason": self.finish_reason,
            "backend": self.backend,
            "model": self.model,
        }
        if self.choices is not None:
            data.update(choice=self.choice, label=self.label)
        return data


def parse(text: str, mode: ModeSpec) -> str | None:
    """The choice an answer makes (None for none, or for a mode without choices)."""
    if not mode.choices:
        return None
    from swallowctl.ppo.rewards import parse_choice

    return parse_choice(text, mode.choices)


def answer(
    backend: InferenceBackend,
    messages: list[Message],
    settings: GenerationSettings,
    mode: ModeSpec,
    on_text: Callable[[str], None] | None = None,
) -> Answer:
    """Generate one answer, handing each text delta to `on_text` as it comes."""
    parts: list[str] = []
    tokens, rate, reason = 0, 0.0, "length"
    for r in backend.stream_generate(messages, settings):
        if r.text and on_text:
            on_text(r.text)
        parts.append(r.text)
        tokens, rate, reason = r.tokens, r.tokens_per_s, r.finish_reason or reason
    text = "".join(parts)
    return Answer(
        text,
        tokens,
        rate,
        reason,
        backend.name,
        backend.model_name,
        mode.choices,
        parse(text, mode),
    )


def write_text(text: str) -> None:
    """A streamed piece of an answer on stdout, as it is (no markup, no newline)."""
    console.out.print(Text(text), end="", highlight=False)


# --- the interactive chat -------------------------------------------------------------------


class _TerminalLines:
    """Lines from a terminal, in a way Ctrl-C always interrupts.

    `input()` blocks inside C (readline's select() on stdin). SIGINT lands on whichever thread
    the kernel picks; when that is one of torch's or MLX's worker threads, Python only notes it,
    and the main thread sleeps on until Enter is pressed. Waiting in 0.1 s slices of a Python
    select() returns to the interpreter often enough to raise the KeyboardInterrupt at once. The
    terminal's own line editing (backspace, Ctrl-U, UTF-8 aware) still works; readline's arrow-key
    history is the price.
    """

    def __init__(self) -> None:
        self.buffer = b""

    def __call__(self, prompt: str) -> str:
        fd = sys.stdin.fileno()
        sys.stdout.write(prompt)
        sys.stdout.flush()
        while b"\n" not in self.buffer:
            if not select.select([fd], [], [], 0.1)[0]:
                continue  # back in Python: a pending Ctrl-C is raised here
            chunk = os.read(fd, 4096)
            if not chunk:  # Ctrl-D on an empty line
                raise EOFError
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode("utf-8", errors="replace")


_terminal = _TerminalLines()


def read_line(prompt: str) -> str:
    """`input()` for the chat: on a POSIX terminal, one that Ctrl-C always interrupts."""
    if os.name == "posix" and sys.stdin.isatty():
        return _terminal(prompt)
    return input(prompt)


HELP = (
    "/reset clears the conversation, /system TEXT sets the system prompt, /exit quits. "
    "Ctrl-C stops an answer; Ctrl-C or Ctrl-D at the prompt quits."
)


class ChatRepl:
    """A terminal chat. Modes with choices judge each line on its own (no history)."""

    def __init__(
        self,
        backend: InferenceBackend,
        mode: ModeSpec,
        settings: GenerationSettings,
        read: Callable[[str], str] | None = None,
    ) -> None:
        self.backend, self.mode, self.settings = backend, mode, settings
        self.read = read or read_line
        self.history: list[Message] = []

    def run(self) -> None:
        """Read, answer, repeat until /exit, Ctrl-D, or Ctrl-C at the prompt."""
        what = "one answer per line" if self.mode.choices else "chat"
        console.info(f"{what} with {self.backend.model_name} on {self.backend.name}. {HELP}")
        while True:
            try:
                line = self.read(PROMPT).strip()
            except (EOFError, KeyboardInterrupt):
                console.print_text("")
                return
            if line.startswith("/"):
                if self.command(line):
                    return
            elif line:
                self.turn(line)

    def command(self, line: str) -> bool:
        """Run a /command; True means quit."""
        name, _, arg = line.partition(" ")
        if name in ("/exit", "/quit"):
            return True
        if name == "/reset":
            self.history.clear()
            console.info("conversation cleared")
        elif name == "/system":
            self.mode = self.mode.model_copy(update={"system": arg.strip() or None})
            console.info("system prompt " + ("set" if arg.strip() else "removed"))
        else:
            console.warn(f"unknown command {name}. {HELP}")
        return False

    def turn(self, text: str) -> None:
        """Answer one line; Ctrl-C keeps what was said so far and returns to the prompt."""
        try:
            user = messages_for(text, self.mode.model_copy(update={"system": None}))[-1]
        except SwallowError as e:
            console.warn(e.message)
            return
        system = [{"role": "system", "content": self.mode.system}] if self.mode.system else []
        history = [] if self.mode.choices else self.history
        parts: list[str] = []
        try:
            stream = self.backend.stream_generate([*system, *history, user], self.settings)
            for r in stream:
                if not self.mode.choices:
                    write_text(r.text)
                parts.append(r.text)
        except KeyboardInterrupt:
            console.print_text("")
            console.warn("stopped")
        else:
            console.print_text("")
        reply = "".join(parts)
        if self.mode.choices:
            console.print_text(choice_line(reply, self.mode))
        else:
            self.history += [user, {"role": "assistant", "content": reply}]


def choice_line(text: str, mode: ModeSpec) -> str:
    """'1: validate', or the no-valid-choice line quoting what the model said."""
    choice = parse(text, mode)
    if choice is None or not mode.choices:
        return f"{NO_CHOICE}: the model answered {text.strip()[:80]!r}"
    return f"{choice}: {mode.choices[choice]}"
