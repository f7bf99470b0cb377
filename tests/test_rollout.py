"""Prompt cutting (`rollout.fit_prompt`): the question and the template survive, turns go first."""

from __future__ import annotations

from typing import Any

import pytest

from swallowctl.core.config import load_config
from swallowctl.core.errors import ConfigError
from swallowctl.core.models import resolve
from swallowctl.ppo import policy, rollout

SYSTEM = {"role": "system", "content": "あなたは親切なアシスタントです。"}
OLD = {"role": "user", "content": "昔話をしてください。" + "むかしむかし、あるところに。" * 30}
REPLY = {"role": "assistant", "content": "はい、わかりました。"}
QUESTION = {"role": "user", "content": "今日の東京の天気はどうですか？" * 6}


@pytest.fixture(scope="module")
def tok() -> Any:
    cfg = load_config(None, ("model.name_or_path=builtin:tiny-ja",)).config
    return policy.load_tokenizer(resolve("builtin:tiny-ja"), cfg)


def length(tok: Any, messages: list[dict[str, str]]) -> int:
    return len(rollout._template_ids(tok, messages))


def test_a_prompt_that_fits_is_left_as_it_is(tok: Any) -> None:
    messages = [SYSTEM, QUESTION]
    fitted, ids = rollout.fit_prompt(tok, messages, 10_000)
    assert fitted is messages and len(ids) == length(tok, messages)


def test_oldest_turns_go_first_and_the_system_prompt_stays(tok: Any) -> None:
    messages = [SYSTEM, OLD, REPLY, QUESTION]
    limit = length(tok, [SYSTEM, REPLY, QUESTION])  # exactly room for all but the oldest turn
    assert length(tok, messages) > limit
    fitted, ids = rollout.fit_prompt(tok, messages, limit)
    assert fitted == [SYSTEM, REPLY, QUESTION] and len(ids) == limit
    assert (
        ids[0] == tok.bos_token_id
    )  # cutting raw ids from the left would have dropped BOS and the system


def test_a_long_question_keeps_its_end_and_fills_the_limit(tok: Any) -> None:
    messages = [SYSTEM, OLD, QUESTION]
    empty = length(tok, [SYSTEM, {"role": "user", "content": ""}])
    limit = empty + 20
    fitted, ids = rollout.fit_prompt(tok, messages, limit)
    assert [m["role"] for m in fitted] == ["system", "user"] and fitted[0] == SYSTEM
    kept = fitted[1]["content"]
    assert kept and QUESTION["content"].endswith(kept) and "\ufffd" not in kept
    assert len(ids) <= limit
    # The largest tail that fits: one more token of the question would not.
    content = tok(QUESTION["content"], add_special_tokens=False)["input_ids"]
    k = next(k for k in range(1, len(content)) if tok.decode(content[-k:]) == kept)
    longer = tok.decode(content[-(k + 1) :])
    assert length(tok, [SYSTEM, {"role": "user", "content": longer}]) > limit
    assert rollout.encode_prompts(tok, [messages], limit) == [ids]  # PPO cuts the same way


def test_a_limit_below_the_template_names_the_key(tok: Any) -> None:
    empty = length(tok, [SYSTEM, {"role": "user", "content": ""}])
    with pytest.raises(ConfigError, match=r"data\.max_prompt_tokens: 10 tokens.*alone take") as e:
        rollout.fit_prompt(tok, [SYSTEM, QUESTION], 10)
    assert str(empty) in e.value.message
