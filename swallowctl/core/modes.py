"""Modes: named prompt profiles shared by train and infer (system prompt, input layout, choices).

A mode turns one input row into chat messages and, when it declares `choices`, parses the model's
answer into one of them. Users add their own under `modes:` in the config.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ModeSpec(BaseModel):
    """One prompt profile. `template` is a `str.format` pattern over the input row's fields."""

    model_config = ConfigDict(extra="forbid")

    system: str | None = Field(None, description="system prompt; None sends no system message")
    template: str = Field("{prompt}", description="user message, formatted from the row's fields")
    choices: dict[str, str] | None = Field(
        None, description="allowed answers -> labels, e.g. {'1': 'validate'}; None = free text"
    )
    output_error_penalty: float = Field(
        -1.0, description="reward for an answer that is none of the choices"
    )


CHAT_SYSTEM = (
    "あなたは誠実で優秀な日本人のアシスタントです。"
    "丁寧な日本語(です・ます調)で簡潔に答えてください。"
)

# The origin project's protocol in our own words: estimate what the target speaker needs and
# answer with one digit only, so `max_new_tokens: 2` (digit + EOS) is enough.
INTERVENTION_SYSTEM = (
    "あなたは三人の会話を見守るロボットです。会話の様子と関係スコアから、"
    "対象の話者がいま何を必要としているかを推定し、次の介入戦略を一つ選んでください。\n"
    "1: 承認(相手の気持ちや意見を認める)\n"
    "2: 橋渡し(二人の共通点をつなぐ)\n"
    "3: 計画(次に何をするかを提案する)\n"
    "4: 介入しない\n"
    "説明は書かず、数字を一つだけ答えてください。"
)

INTERVENTION_CHOICES = {"1": "validate", "2": "bridge", "3": "plan", "4": "no_intervention"}

BUILTIN_MODES: dict[str, ModeSpec] = {
    "chat": ModeSpec(system=CHAT_SYSTEM),
    "intervention": ModeSpec(system=INTERVENTION_SYSTEM, choices=INTERVENTION_CHOICES),
}
