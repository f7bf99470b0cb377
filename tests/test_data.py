"""Tests for swallowctl/ppo/data.py: reading, validating and rendering prompts; the batch stream."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from swallowctl.core.errors import ConfigError, DataError, MissingDependencyError
from swallowctl.core.modes import BUILTIN_MODES, CHAT_SYSTEM, INTERVENTION_SYSTEM, ModeSpec
from swallowctl.ppo import data
from swallowctl.ppo.data import (
    PromptRow,
    PromptStream,
    load_prompts,
    render_messages,
    reward_columns,
)

CHAT = BUILTIN_MODES["chat"]
INTERVENTION = BUILTIN_MODES["intervention"]


def write_lines(path: Path, lines: list[Any]) -> Path:
    """Write each item as one line: dicts/lists as JSON, str as they are."""
    text = "".join(
        (x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines
    )
    path.write_text(text, encoding="utf-8")
    return path


def data_error(spec: Path | str, mode: ModeSpec = CHAT) -> str:
    with pytest.raises(DataError) as info:
        load_prompts(str(spec), mode)
    assert info.value.exit_code == 2
    return info.value.message


# --- good files -----------------------------------------------------------------------------


def test_prompt_and_messages_rows_render_with_the_mode(tmp_path: Path) -> None:
    f = write_lines(
        tmp_path / "p.jsonl",
        [
            {"prompt": "富士山の高さは？", "id": 7, "answer": "3776m"},
            "",  # blank lines are skipped but still counted for line numbers
            {"messages": [{"role": "user", "content": "こんにちは"}], "tag": "greet"},
            {
                "messages": [
                    {"role": "system", "content": "関西弁で答えて"},
                    {"role": "user", "content": "元気？"},
                ]
            },
        ],
    )
    rows = load_prompts(str(f), CHAT)
    assert [r.where for r in rows] == [f"{f}:1", f"{f}:3", f"{f}:4"]
    assert rows[0].messages == [
        {"role": "system", "content": CHAT_SYSTEM},
        {"role": "user", "content": "富士山の高さは？"},
    ]
    # Columns (prompt included) are kept for the reward functions; messages are not a column.
    assert rows[0].columns == {"prompt": "富士山の高さは？", "id": 7, "answer": "3776m"}
    assert rows[1].messages[0] == {"role": "system", "content": CHAT_SYSTEM}
    assert rows[1].columns == {"tag": "greet"}
    # A row with its own system message keeps it, and gets no second one.
    assert rows[2].messages[0]["content"] == "関西弁で答えて"
    assert [m["role"] for m in rows[2].messages] == ["system", "user"]


def test_template_uses_row_columns_and_mode_without_system(tmp_path: Path) -> None:
    mode = ModeSpec(system=None, template="【{topic}】{prompt}")
    f = write_lines(tmp_path / "p.jsonl", [{"prompt": "説明して", "topic": "物理"}])
    (row,) = load_prompts(str(f), mode)
    assert row.messages == [{"role": "user", "content": "【物理】説明して"}]


def test_template_naming_a_missing_column_names_column_and_line(tmp_path: Path) -> None:
    mode = ModeSpec(template="{topic}: {prompt}")
    f = write_lines(tmp_path / "p.jsonl", [{"prompt": "a", "topic": "x"}, {"prompt": "b"}])
    msg = data_error(f, mode)
    assert msg.startswith(f"{f}:2: ")
    assert "{topic}" in msg and "'topic' column" in msg and "prompt" in msg


def test_invalid_template_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not a valid format string"):
        render_messages({"prompt": "x"}, ModeSpec(template="{prompt"))


def test_bom_and_crlf_are_accepted(tmp_path: Path) -> None:
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + '{"prompt": "やあ"}\r\n{"prompt": "おはよう"}\r\n'.encode())
    assert [r.columns["prompt"] for r in load_prompts(str(f), CHAT)] == ["やあ", "おはよう"]


def test_limit_reads_only_that_many_rows(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "p.jsonl", [{"prompt": "一"}, {"prompt": "二"}, "{broken"])
    assert len(load_prompts(str(f), CHAT, limit=2)) == 2
    with pytest.raises(DataError):
        load_prompts(str(f), CHAT, limit=3)


def test_json_array_file_with_line_numbers(tmp_path: Path) -> None:
    f = tmp_path / "p.json"
    f.write_text('[\n  {"prompt": "一"},\n  {"prompt": "二"}\n]\n', encoding="utf-8")
    rows = load_prompts(str(f), CHAT)
    assert [r.where for r in rows] == [f"{f}:2", f"{f}:3"]
    f.write_text('[\n  {"prompt": "一"},\n  {"nope": 1}\n]\n', encoding="utf-8")
    assert data_error(f).startswith(f"{f}:3: needs 'prompt'")
    f.write_text('[\n  {"prompt": "一"},\n  {"prompt": }\n]', encoding="utf-8")
    assert data_error(f).startswith(f"{f}:3: not valid JSON")


def test_json_suffix_with_jsonl_content(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "p.json", [{"prompt": "一"}, {"prompt": "二"}])
    assert len(load_prompts(str(f), CHAT)) == 2


# --- bad files: FILE:LINE: what is wrong ---------------------------------------------------------

GOOD = {"prompt": "ok"}
BAD_LINES: list[tuple[str, Any, str]] = [
    ("malformed-json", '{"prompt": "a",}', "not valid JSON"),
    ("not-an-object", '["prompt", "a"]', "expected a JSON object, got a list"),
    ("string-line", '"just text"', "expected a JSON object, got a string"),
    ("neither", {"text": "a"}, "needs 'prompt' (text) or 'messages'"),
    ("both", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "both"),
    ("empty-prompt", {"prompt": "  "}, "'prompt' is empty"),
    ("prompt-not-str", {"prompt": 42}, "'prompt' must be a string, got a number"),
    ("messages-not-list", {"messages": "hi"}, "'messages' must be a list"),
    ("messages-empty", {"messages": []}, "'messages' is empty"),
    ("message-not-object", {"messages": ["hi"]}, "messages[0] must be an object"),
    ("no-content", {"messages": [{"role": "user"}]}, "messages[0] has no 'content'"),
    ("content-not-str", {"messages": [{"role": "user", "content": 1}]}, "content must be a"),
    ("bad-role", {"messages": [{"role": "bot", "content": "x"}]}, "role is 'bot'"),
    (
        "late-system",
        {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
        "a system message may only come first",
    ),
    (
        "ends-on-assistant",
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        "last message must be from the user",
    ),
    ("reserved-column", {"prompt": "a", "finished": True}, "column 'finished' clashes"),
]


@pytest.mark.parametrize(
    ("line", "expected"), [(b[1], b[2]) for b in BAD_LINES], ids=[b[0] for b in BAD_LINES]
)
def test_bad_line_reports_file_line_and_problem(tmp_path: Path, line: Any, expected: str) -> None:
    f = write_lines(tmp_path / "p.jsonl", [GOOD, "", line, GOOD])
    msg = data_error(f)
    assert msg.startswith(f"{f}:3: "), msg
    assert expected in msg
    assert "\n" not in msg and "more bad" not in msg


def test_first_error_and_count_of_the_others(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "p.jsonl", [GOOD, {"x": 1}, GOOD, "{", {"prompt": ""}])
    msg = data_error(f)
    assert msg.startswith(f"{f}:2: needs 'prompt'")
    assert msg.endswith("(and 2 more bad lines)")
    f = write_lines(tmp_path / "q.jsonl", [{"x": 1}, "{"])
    assert data_error(f).endswith("(and 1 more bad line)")


def test_huge_line_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    f = tmp_path / "big.jsonl"
    huge = json.dumps({"prompt": "あ" * (data.MAX_LINE_BYTES // 3 + 10)}).encode()
    f.write_bytes(json.dumps(GOOD).encode() + b"\n" + huge + b"\n" + b'{"prompt": "x"}\n')
    msg = data_error(f)
    assert msg.startswith(f"{f}:2: line is longer than 1,000,000 bytes")
    # The line after the long one is read normally (only one bad line).
    assert "more bad" not in msg


def test_non_utf8_bytes(tmp_path: Path) -> None:
    f = tmp_path / "sjis.jsonl"
    f.write_bytes(b'{"prompt": "ok"}\n' + '{"prompt": "日本語"}'.encode("shift_jis") + b"\n")
    msg = data_error(f)
    assert msg.startswith(f"{f}:2: not UTF-8")


def test_empty_file_blank_file_missing_file_and_folder(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert data_error(empty) == f"{empty}:1: the file is empty"
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\t\n", encoding="utf-8")
    assert data_error(blank) == f"{blank}:1: no prompts: it holds only blank lines"
    assert data_error(tmp_path / "nope.jsonl") == f"{tmp_path / 'nope.jsonl'}: no such file"
    folder = tmp_path / "dir.jsonl"
    folder.mkdir()
    assert "is a folder" in data_error(folder)


def test_a_spec_that_is_no_source_at_all() -> None:
    assert "not a file, a Hub dataset id" in data_error("prompts")


# --- Hub datasets ----------------------------------------------------------------------------


def test_hub_dataset_without_datasets_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(MissingDependencyError) as info:
        load_prompts("someone/prompts", CHAT)
    assert "someone/prompts" in info.value.message and "datasets" in info.value.message
    assert info.value.hint and "pip install datasets" in info.value.hint


def test_hub_dataset_rows_are_validated_like_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []

    def load_dataset(repo: str, split: str) -> list[dict[str, Any]]:
        calls.append((repo, split))
        return [{"prompt": "一", "messages": None}, {"prompt": None, "messages": None}]

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    msg = data_error("someone/prompts:test")
    assert calls == [("someone/prompts", "test")]
    assert msg.startswith("someone/prompts[test]:2: needs 'prompt'")
    (row,) = load_prompts("someone/prompts", CHAT, limit=1)
    assert row.where == "someone/prompts[train]:1" and row.columns == {"prompt": "一"}


# --- the bundled set -------------------------------------------------------------------------


def test_builtin_prompts_ja_chat_rows() -> None:
    rows = load_prompts("builtin:prompts-ja", CHAT)
    assert len(rows) >= 300
    prompts = [r.columns["prompt"] for r in rows]
    assert all(p.strip() for p in prompts)
    assert len(set(prompts)) == len(prompts)
    assert all("mode" not in r.columns for r in rows)  # the subset selector is not a column
    assert all(r.messages[0]["content"] == CHAT_SYSTEM for r in rows)
    # Japanese, not English: every prompt is mostly Japanese script.
    from swallowctl.ppo.rewards import japanese_ratio

    assert min(r or 0.0 for r in japanese_ratio([], prompts)) > 0.6


def test_builtin_prompts_ja_intervention_rows() -> None:
    rows = load_prompts("builtin:prompts-ja", INTERVENTION)
    assert len(rows) >= 50
    prompts = [r.columns["prompt"] for r in rows]
    assert len(set(prompts)) == len(prompts)
    for r in rows:
        c = r.columns
        assert r.messages[0]["content"] == INTERVENTION_SYSTEM
        assert {"utterances", "scores", "edge", "target"} <= set(c)
        assert c["edge"] in ("AB", "BC", "CA") and c["target"] in c["edge"]
        weights = {e: c[f"w_{e}"] for e in ("AB", "BC", "CA")}
        assert min(weights, key=weights.__getitem__) == c["edge"] and weights[c["edge"]] < 0
        assert c["scores"] == ", ".join(f"w_{e}={weights[e]:+.2f}" for e in ("AB", "BC", "CA"))
        assert c["scores"] in c["prompt"] and f"対象の話者: {c['target']}" in c["prompt"]
        assert all(line[:3] in ("A: ", "B: ", "C: ") for line in c["utterances"].splitlines())


def test_builtin_subset_choice_for_user_modes() -> None:
    mine = ModeSpec(system="短く答えて", template="Q: {prompt}")
    rows = load_prompts("builtin:prompts-ja", mine, limit=3)
    assert rows[0].messages[1]["content"].startswith("Q: ")
    # A user mode can ask for the observation rows by name and lay them out from the columns.
    obs = ModeSpec(template="{target}さんへの介入: {scores}", choices={"1": "a"})
    (row,) = load_prompts("builtin:prompts-ja", obs, limit=1, mode_name="intervention")
    assert row.messages[-1]["content"].startswith(f"{row.columns['target']}さんへの介入: w_AB=")
    assert data.builtin_subsets()["chat"] >= 300


# --- batches ---------------------------------------------------------------------------------


def make_rows(n: int) -> list[PromptRow]:
    return [
        PromptRow([{"role": "user", "content": f"q{i}"}], {"prompt": f"q{i}", "i": i}, f"f:{i}")
        for i in range(n)
    ]


def ids(batch: list[PromptRow]) -> list[int]:
    return [r.columns["i"] for r in batch]


def test_stream_covers_every_row_once_per_epoch_and_reshuffles() -> None:
    stream = PromptStream(make_rows(10), batch_size=5, seed=3)
    epoch0 = ids(next(stream)) + ids(next(stream))
    epoch1 = ids(next(stream)) + ids(next(stream))
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1  # a new order each epoch
    again = PromptStream(make_rows(10), batch_size=5, seed=3)
    assert ids(next(again)) + ids(next(again)) == epoch0  # deterministic from the seed
    other = PromptStream(make_rows(10), batch_size=5, seed=4)
    assert ids(next(other)) + ids(next(other)) != epoch0


def test_stream_batches_span_epochs_and_unshuffled_order() -> None:
    stream = PromptStream(make_rows(5), batch_size=3, shuffle=False)
    assert [ids(next(stream)) for _ in range(3)] == [[0, 1, 2], [3, 4, 0], [1, 2, 3]]
    assert stream.state_dict()["epoch"] == 1 and stream.state_dict()["position"] == 4


def test_stream_restore_gives_the_same_next_batches() -> None:
    rows = make_rows(7)
    stream = PromptStream(rows, batch_size=3, seed=11)
    for _ in range(5):
        next(stream)
    state = json.loads(json.dumps(stream.state_dict()))  # checkpoints store it as JSON
    expected = [ids(next(stream)) for _ in range(6)]
    fresh = PromptStream(rows, batch_size=3, seed=0)  # the checkpoint's seed wins
    fresh.load_state_dict(state)
    assert [ids(next(fresh)) for _ in range(6)] == expected
    assert {"epoch", "position", "seed"} <= set(state)


def test_stream_refuses_a_changed_prompt_set() -> None:
    state = PromptStream(make_rows(7), batch_size=2).state_dict()
    with pytest.raises(DataError, match="7 rows then, 8 now"):
        PromptStream(make_rows(8), batch_size=2).load_state_dict(state)


def test_reward_columns_collates_one_list_per_column() -> None:
    rows = make_rows(2)
    rows[1].columns["extra"] = "x"
    cols = reward_columns(rows)
    assert cols["i"] == [0, 1] and cols["extra"] == [None, "x"]
    assert cols["messages"] == [r.messages for r in rows]


def test_ranks_split_each_global_batch_without_overlap() -> None:
    rows = make_rows(9)
    single = PromptStream(rows, seed=5)
    ranks = [PromptStream(rows, seed=5, rank=r, world=3) for r in range(3)]
    for _ in range(4):  # crosses epoch boundaries (9 rows, 6 per global batch)
        whole = ids(single.next_batch(6))
        parts = [ids(s.next_batch(2)) for s in ranks]
        assert [i for part in parts for i in part] == whole
    # Every rank holds the same cursor, so any rank's checkpoint resumes all of them.
    assert all(s.state_dict() == single.state_dict() for s in ranks)
    with pytest.raises(ValueError, match="positive size"):
        PromptStream(rows).next_batch()
