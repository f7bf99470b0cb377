"""Tests for swallowctl/ppo/rewards.py: built-ins on Japanese text, loading user functions, the
reward model, the HTTP endpoint, and RewardSet (once per batch, concurrent, timeouts, retries)."""

from __future__ import annotations

import base64
import http.server
import json
import math
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from swallowctl.core.config import RewardSpec
from swallowctl.core.errors import ConfigError, DataError, RuntimeFailure
from swallowctl.core.modes import BUILTIN_MODES, INTERVENTION_CHOICES, ModeSpec
from swallowctl.ppo import rewards
from swallowctl.ppo.rewards import (
    HttpReward,
    RewardComponent,
    RewardModel,
    RewardSet,
    check_reward_specs,
    format_eos,
    japanese_ratio,
    length_window,
    load_reward_function,
    parse_choice,
    polite,
    repetition_penalty,
)

# --- built-ins, hand-checked ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("こんにちは。", 1.0),
        ("カタカナと漢字、ひらがな！", 1.0),
        ("Hello、世界", 3 / 8),  # H e l l o | 、 世 界
        ("これはPythonです", 5 / 11),  # これは です = 5 of 11
        ("AI は 便利 です。", 6 / 8),  # spaces do not count; A I are 2 of 8
        ("2024年です", 3 / 7),  # digits count against it by default
        ("ｶﾀｶﾅ", 1.0),  # half-width katakana is Japanese script
        ("👍OK", 0.0),
        ("   ", 0.0),
        ("", 0.0),
    ],
)
def test_japanese_ratio(text: str, expected: float) -> None:
    assert japanese_ratio([""], [text]) == [pytest.approx(expected)]


def test_japanese_ratio_can_ignore_digits() -> None:
    assert japanese_ratio([""], ["2024年です"], ignore_digits=True) == [1.0]
    assert japanese_ratio([""], ["１２３"], ignore_digits=True) == [0.0]  # nothing left: 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("はい、承知しました。", 1.0),
        ("はい、承知しました", 1.0),  # a final sentence without 。 still counts
        ("今日は晴れだ。明日は雨です。", 0.5),
        ("ありがとうございます！また来てくださいね。", 1.0),
        ("何ですか？", 1.0),
        ("そうですよね。そうかもね。", 0.5),
        ("「はい、そうです。」と答えた。", 0.5),  # 「…です。」 polite, と答えた。 plain
        ("手順は次のとおりです。\n・材料を切る\n・炒める\n以上です。", 1.0),  # bullets not judged
        ("いいよ。まかせて！", 0.0),
        ("Sure, I can help.", 0.0),  # no Japanese sentence at all
        ("", 0.0),
    ],
)
def test_polite(text: str, expected: float) -> None:
    assert polite([""], [text]) == [pytest.approx(expected)]


def test_length_window() -> None:
    texts = ["あ" * 5, "あ" * 10, "あ" * 15, "あ" * 20, "あ" * 30, "あ" * 45, "", "  あ  "]
    got = length_window([""] * 8, texts, min_chars=10, max_chars=20)
    assert got == pytest.approx([0.5, 1.0, 1.0, 1.0, 0.5, 0.0, 0.0, 0.1])
    with pytest.raises(ValueError, match="min_chars <= max_chars"):
        length_window([], [], min_chars=30, max_chars=20)


def test_repetition_penalty() -> None:
    # "ああああ" has the 2-grams ああ x3: 1 distinct of 3 -> -(1 - 1/3).
    got = repetition_penalty(["", "", "", ""], ["ああああ", "abab", "あいうえお", "あ"], n=2)
    assert got == pytest.approx([-2 / 3, -1 / 3, 0.0, 0.0])
    heavy = repetition_penalty([""], ["同じ文です。" * 50])[0]
    assert heavy is not None and -1.0 < heavy < -0.95
    natural = repetition_penalty([""], ["今日は天気がよいので、公園まで散歩に出かけました。"])
    assert natural == [0.0]
    # Token n-grams from completion_ids: (1,2) (2,1) (1,2) -> 2 distinct of 3.
    assert repetition_penalty([""], ["x"], [[1, 2, 1, 2]], n=2, unit="token") == [
        pytest.approx(-1 / 3)
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", "1"),
        (" 2 \n", "2"),
        ("１", "1"),  # full-width digit
        ("３。", "3"),
        ("4\n理由: 落ち着いているから", "4"),
        ("1<|eot_id|>", "1"),
        ("2: 橋渡し", "2"),
        ("12", None),
        ("5", None),
        ("1 validate", None),
        ("答えは1", None),
        ("", None),
        ("validate", None),
    ],
)
def test_parse_choice(text: str, expected: str | None) -> None:
    assert parse_choice(text, INTERVENTION_CHOICES) == expected


def test_parse_choice_prefers_the_longest_key() -> None:
    assert parse_choice("10", ["1", "10"]) == "10"
    assert parse_choice("1", ["1", "10"]) == "1"


def test_format_eos() -> None:
    texts = ["はい。", "途中で切れ"]
    assert format_eos(["", ""], texts, finished=[True, False]) == [1.0, 0.0]
    got = format_eos(
        [""] * 4,
        ["2", "2", "よくわからない", "よくわからない"],
        finished=[True, False, True, False],
        choices=INTERVENTION_CHOICES,
        output_error_penalty=-1.0,
    )
    assert got == [1.0, 0.0, -1.0, -1.0]


# --- loading user functions ------------------------------------------------------------------

USER_MODULE = """
CALLS = []
def score(prompts, completions, completion_ids, **kwargs):
    CALLS.append(kwargs)
    return [float(len(c)) for c in completions]
def no_kwargs(prompts, completions, completion_ids):
    return [0.0] * len(completions)
class Scorer:
    pass
NOT_CALLABLE = 3
"""


@pytest.fixture
def user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on sys.path with a reward module and an unrelated module (that must stay unread)."""
    name = f"user_rewards_{tmp_path.name}".replace("-", "_")
    (tmp_path / f"{name}.py").write_text(USER_MODULE, encoding="utf-8")
    (tmp_path / f"unrelated_{name}.py").write_text("raise RuntimeError('imported!')\n")
    (tmp_path / f"broken_{name}.py").write_text("import not_installed_pkg_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for mod in [m for m in sys.modules if name in m]:
        del sys.modules[mod]


def module_name(user_dir: Path) -> str:
    return f"user_rewards_{user_dir.name}".replace("-", "_")


def test_load_builtin_and_user_function(user_dir: Path) -> None:
    assert load_reward_function("japanese_ratio") is japanese_ratio
    mod = module_name(user_dir)
    fn = load_reward_function(f"{mod}:score")
    assert fn([""], ["あいう"], [[1]]) == [3.0]
    assert mod in sys.modules
    assert f"unrelated_{mod}" not in sys.modules  # only the named module was imported


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("japanese_raito", "did you mean 'japanese_ratio'"),
        ("no_such_module_xyz:score", "no module named 'no_such_module_xyz'"),
        ("{mod}:missing", "has no 'missing'"),
        ("{mod}:NOT_CALLABLE", "is a int, not a function"),
        ("{mod}:Scorer", "is a class, not a function"),
        ("broken_{mod}:score", "it needs 'not_installed_pkg_xyz'"),
        ("bad module:score", "is not package.module:function"),
    ],
)
def test_load_errors_name_index_and_spec(user_dir: Path, spec: str, message: str) -> None:
    spec = spec.format(mod=module_name(user_dir))
    with pytest.raises(ConfigError) as info:
        load_reward_function(spec, index=3)
    full = f"{info.value.message} {info.value.hint}"
    assert info.value.message.startswith("rewards[3].function: ")
    assert message in full
    if spec.startswith(("japanese", "bad")):
        return
    assert spec.split(":")[0] in info.value.message


def test_check_reward_specs(user_dir: Path) -> None:
    mod = module_name(user_dir)
    check_reward_specs(
        [
            RewardSpec(function="length_window", kwargs={"min_chars": 5, "max_chars": 9}),
            RewardSpec(function=f"{mod}:score", kwargs={"anything": 1}),
            RewardSpec(model="builtin:tiny-ja-reward", kwargs={"batch_size": 2}),
            RewardSpec(url="http://127.0.0.1:9/score"),
        ]
    )
    cases = [
        (RewardSpec(function="length_window", kwargs={"min_char": 5}), "does not take 'min_char'"),
        (RewardSpec(function="length_window", kwargs={"min_chars": 500}), "min_chars <= max_chars"),
        (RewardSpec(function=f"{mod}:no_kwargs"), "must accept **kwargs"),
        (RewardSpec(model="m", kwargs={"dtype": "x"}), "does not take 'dtype'"),
        (RewardSpec(url="ftp://host/x"), "is not an http(s) URL"),
    ]
    for spec, message in cases:
        with pytest.raises(ConfigError) as info:
            check_reward_specs([RewardSpec(function="polite"), spec])
        assert info.value.message.startswith("rewards[1]")
        assert message in info.value.message
    with pytest.raises(ConfigError, match="label 'polite' is also rewards\\[0\\]"):
        check_reward_specs([RewardSpec(function="polite"), RewardSpec(function="polite")])


# --- RewardSet -------------------------------------------------------------------------------


class Counting:
    """A reward function that counts its calls and records its arguments."""

    def __init__(self, value: float | None = 1.0, sleep: float = 0.0, fail_first: int = 0):
        self.value, self.sleep, self.fail_first = value, sleep, fail_first
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.__name__ = "counting"

    def __call__(
        self, prompts: list[str], completions: list[str], completion_ids: Any, **kwargs: Any
    ) -> list[float | None]:
        with self.lock:
            self.calls.append({"prompts": prompts, "completion_ids": completion_ids, **kwargs})
            attempt = len(self.calls)
        if self.sleep:
            time.sleep(self.sleep)
        if attempt <= self.fail_first:
            raise ConnectionError(f"flaky #{attempt}")
        return [self.value] * len(completions)


def call(rs: RewardSet, n: int = 2, **kw: Any) -> rewards.RewardResult:
    args: dict[str, Any] = {
        "prompts": ["問"] * n,
        "completions": ["はい、承知しました。"] * n,
        "completion_ids": [[1, 2]] * n,
        "finished": [True] * n,
        "columns": {"topic": [f"t{i}" for i in range(n)]},
        "mode": "chat",
    }
    args.update(kw)
    return rs(**args)


def test_each_component_called_once_per_batch_with_columns_and_weights() -> None:
    a, b = Counting(1.0), Counting(None)
    with RewardSet(
        [
            RewardComponent("a", a, weight=2.0, kwargs={"scale": 3}),
            RewardComponent("b", b, weight=5.0),
            RewardComponent("polite", polite, weight=0.5),
        ]
    ) as rs:
        for _ in range(3):
            result = call(rs, n=3)
    assert len(a.calls) == len(b.calls) == 3  # once per batch, three batches
    kw = a.calls[0]
    assert kw["topic"] == ["t0", "t1", "t2"] and kw["finished"] == [True] * 3
    assert kw["mode"] == "chat" and kw["scale"] == 3
    # total = 2 * 1 + 5 * (None -> counts 0) + 0.5 * 1
    assert result.total == [2.5, 2.5, 2.5]
    assert result.components["a"] == [1.0] * 3
    assert all(math.isnan(v) for v in result.components["b"])  # None kept as NaN
    assert result.means()["polite"] == 1.0 and math.isnan(result.means()["b"])
    assert set(result.seconds) == {"a", "b", "polite"}


def test_components_run_concurrently() -> None:
    slow1, slow2 = Counting(sleep=0.3), Counting(sleep=0.3)
    with RewardSet([RewardComponent("s1", slow1), RewardComponent("s2", slow2)]) as rs:
        start = time.perf_counter()
        call(rs)
        elapsed = time.perf_counter() - start
    assert elapsed < 0.55, f"components ran one after the other ({elapsed:.2f}s)"


def test_retry_after_one_failure() -> None:
    flaky = Counting(value=0.5, fail_first=1)
    with RewardSet([RewardComponent("flaky", flaky, retries=1)], backoff_s=0.01) as rs:
        assert call(rs).total == [0.5, 0.5]
    assert len(flaky.calls) == 2


def test_failure_after_retries_names_the_component_and_cause() -> None:
    broken = Counting(fail_first=99)
    comp = RewardComponent("judge", broken, retries=2, index=4)
    rs = RewardSet([RewardComponent("ok", Counting()), comp], backoff_s=0.01)
    with rs, pytest.raises(RuntimeFailure) as info:
        call(rs)
    assert len(broken.calls) == 3
    msg = info.value.message
    assert "rewards[4] 'judge'" in msg and "3 attempt(s)" in msg
    assert "ConnectionError: flaky #3" in msg


def test_timeout_names_the_component() -> None:
    hung = Counting(sleep=2.0)
    with RewardSet([RewardComponent("hung", hung, timeout_s=0.1, retries=1)], backoff_s=0.01) as rs:
        start = time.perf_counter()
        with pytest.raises(RuntimeFailure, match=r"'hung' failed after 2 attempt\(s\): timed out"):
            call(rs)
    assert time.perf_counter() - start < 1.0
    assert len(hung.calls) == 2


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ([1.0], "returned 1 values for 2 completions"),
        (None, "returned NoneType"),
        (["0.5", 1.0], "returned the string '0.5'"),
        ([math.inf, 0.0], "returned inf"),
    ],
)
def test_bad_return_values_fail_at_once(returned: Any, message: str) -> None:
    calls = []

    def bad(prompts: list[str], completions: list[str], completion_ids: Any, **kw: Any) -> Any:
        calls.append(1)
        return returned

    rs = RewardSet([RewardComponent("bad", bad, retries=3)])
    with rs, pytest.raises(RuntimeFailure, match="'bad'") as info:
        call(rs)
    assert message in info.value.message
    assert calls == [1]  # a bug is not retried


def test_format_eos_gets_the_modes_choices_and_finished_from_stop_ids() -> None:
    with RewardSet([RewardComponent("format_eos", format_eos)], stop_token_ids=[9]) as rs:
        r = rs(
            ["", "", ""], ["2", "2", "にばん"], [[5, 9], [5, 5], [5, 9]], None, {}, "intervention"
        )
        assert r.total == [1.0, 0.0, -1.0]
        r = rs(["", ""], ["2", "にばん"], [[5, 9], [5, 9]], None, {}, "chat")
        assert r.total == [1.0, 1.0]  # free text: any finished answer is well-formed


def test_reserved_column_names_are_refused() -> None:
    rs = RewardSet([RewardComponent("a", Counting())])
    with rs, pytest.raises(DataError, match="'mode'"):
        call(rs, columns={"mode": ["x", "y"]})


def test_from_config_defaults_when_no_rewards_are_configured() -> None:
    with RewardSet.from_config([], mode="chat") as rs:
        assert rs.labels == ["format_eos", "japanese_ratio", "repetition_penalty"]
        result = call(rs, n=1)
        assert result.components["japanese_ratio"] == [1.0]
        assert result.total == [pytest.approx(2.0)]
    with RewardSet.from_config([], mode="intervention") as rs:
        assert rs.labels == ["format_eos"]


def test_from_config_user_function_and_builtin_kwargs(user_dir: Path) -> None:
    mod = module_name(user_dir)
    specs = [
        RewardSpec(function=f"{mod}:score", weight=0.1, name="len", kwargs={"k": 1}),
        RewardSpec(function="length_window", kwargs={"min_chars": 20, "max_chars": 40}),
    ]
    with RewardSet.from_config(specs) as rs:
        result = call(rs, n=1)  # "はい、承知しました。" is 10 chars
    assert result.components == {"len": [10.0], "length_window": [0.5]}
    assert result.total == [pytest.approx(1.5)]
    user_calls = sys.modules[mod].CALLS
    assert len(user_calls) == 1 and user_calls[0]["k"] == 1


# --- the reward model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RewardModel]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SWALLOWCTL_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield RewardModel("builtin:tiny-ja-reward", batch_size=2)


def test_reward_model_scores_each_sample_deterministically(reward_model: RewardModel) -> None:
    messages = [
        [{"role": "user", "content": "こんにちは"}],
        [{"role": "system", "content": "丁寧に"}, {"role": "user", "content": "元気ですか？"}],
        [{"role": "user", "content": "一言で"}],
    ]
    completions = ["はい、元気です。", "はい", "OK"]
    first = reward_model(["", "", ""], completions, None, messages=messages)
    assert len(first) == 3 and all(isinstance(v, float) and math.isfinite(v) for v in first)
    assert len(set(first)) == 3  # different texts, different scores
    assert reward_model(["", "", ""], completions, None, messages=messages) == first
    # Batching (and its padding) must not change a score.
    alone = [
        reward_model([""], [c], None, messages=[m])[0]
        for c, m in zip(completions, messages, strict=True)
    ]
    assert alone == pytest.approx(first, abs=1e-5)
    # The model's own chat template lays the text out, with the completion as assistant turn.
    text = reward_model.text(messages[0], "", completions[0])
    assert text.count("<|begin_of_text|>") == 1
    assert text.endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\nはい、元気です。<|eot_id|>"
    )


def test_reward_model_in_a_reward_set(reward_model: RewardModel) -> None:
    with RewardSet([RewardComponent("rm", reward_model, weight=2.0)]) as rs:
        result = call(rs, n=2, columns={})
    assert result.total == pytest.approx([2 * v for v in result.components["rm"]])


# --- the HTTP endpoint -----------------------------------------------------------------------


class Endpoint:
    """A scripted scoring server on 127.0.0.1: answers each POST with the next (status, body)."""

    def __init__(self, script: list[tuple[int, Any]]):
        self.script = list(script)
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append(json.loads(body))
                outer.headers.append(dict(self.headers))
                status, answer = outer.script.pop(0) if outer.script else (500, "empty")
                data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[Endpoint]]:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    made: list[Endpoint] = []

    def make(script: list[tuple[int, Any]]) -> Endpoint:
        made.append(Endpoint(script))
        return made[-1]

    yield make  # type: ignore[misc]
    for e in made:
        e.close()


def test_http_reward_contract(endpoint: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    ep = endpoint([(200, {"rewards": [0.5, None]})])
    monkeypatch.setenv("SCORER_TOKEN", "s3cret")
    http = HttpReward(ep.url, token_env="SCORER_TOKEN", extra={"rubric": "丁寧さ"})
    got = http(["問1", "問2"], ["答1", "答2"], [[1], [2]], finished=[True, False], topic=["a", "b"])
    assert got == [0.5, None]
    (body,) = ep.requests
    assert body == {
        "prompts": ["問1", "問2"],
        "completions": ["答1", "答2"],
        "completion_ids": [[1], [2]],
        "finished": [True, False],
        "topic": ["a", "b"],
        "rubric": "丁寧さ",
    }
    assert ep.headers[0]["Authorization"] == "Bearer s3cret"


def test_http_reward_retries_a_500_then_succeeds(endpoint: Any) -> None:
    ep = endpoint([(500, "overloaded"), (200, {"rewards": [1.0]})])
    assert HttpReward(ep.url, retries=1, backoff_s=0.01)([""], ["x"], [[1]]) == [1.0]
    assert len(ep.requests) == 2


@pytest.mark.parametrize(
    ("script", "message", "requests"),
    [
        ([(400, "bad field")], "answered HTTP 400: bad field", 1),  # client errors: no retry
        ([(503, "")] * 3, "failed after 3 attempt(s): HTTP 503", 3),
        ([(200, "<html>")], "answered non-JSON", 1),
        ([(200, {"scores": [1]})], "without a 'rewards' list", 1),
        ([(200, {"rewards": [1, 2]})], "returned 2 rewards for 1 completions", 1),
    ],
)
def test_http_reward_errors_name_the_url_but_no_secret(
    endpoint: Any, script: list[tuple[int, Any]], message: str, requests: int
) -> None:
    ep = endpoint(script)
    url = ep.url.replace("http://", "http://user:pw@") + "?token=s3cret"
    with pytest.raises(RuntimeFailure) as info:
        HttpReward(url, retries=2, backoff_s=0.01)([""], ["x"], [[1]])
    msg = info.value.message
    assert message in msg and len(ep.requests) == requests
    assert ep.url + "?token=..." in msg
    assert "s3cret" not in msg and "pw" not in msg
    # user:password@ travels as a Basic auth header (urllib cannot send it in the URL).
    assert ep.headers[0]["Authorization"] == "Basic " + base64.b64encode(b"user:pw").decode()


def test_http_reward_unreachable_through_reward_set() -> None:
    spec = RewardSpec(url="http://127.0.0.1:9/score", timeout_s=0.5, retries=0, name="remote")
    rs = RewardSet.from_config([spec])
    with rs, pytest.raises(RuntimeFailure, match=r"rewards\[0\] 'remote'.*127\.0\.0\.1:9/score"):
        call(rs)


def test_http_reward_through_reward_set(endpoint: Any) -> None:
    ep = endpoint([(200, {"rewards": [0.25, 0.75]})])
    spec = RewardSpec(url=ep.url, weight=2.0, kwargs={"rubric": "r"})
    with RewardSet.from_config([spec]) as rs:
        result = call(rs)
    assert result.total == [0.5, 1.5]
    assert ep.requests[0]["mode"] == "chat" and ep.requests[0]["rubric"] == "r"
    assert ep.requests[0]["topic"] == ["t0", "t1"]
    assert list(result.components) == [ep.url]


def test_builtin_modes_are_known_to_a_set() -> None:
    with RewardSet([RewardComponent("a", Counting())]) as rs:
        assert set(BUILTIN_MODES) <= set(rs.modes)


def test_from_config_takes_the_runs_mode_spec() -> None:
    yes_no = ModeSpec(
        system="はい/いいえで答えて",
        choices={"はい": "yes", "いいえ": "no"},
        output_error_penalty=-0.5,
    )
    with RewardSet.from_config([RewardSpec(function="format_eos")], mode=yes_no) as rs:
        r = rs(["", ""], ["はい。", "たぶん"], [[1], [1]], [True, True], {}, "yes_no")
    assert r.total == [1.0, -0.5]
    with RewardSet.from_config([], mode=yes_no) as rs:
        assert rs.labels == ["format_eos"]  # a choice mode's default: the format check alone
    with pytest.raises(ConfigError, match="unknown mode 'nope'"):
        RewardSet.from_config([], mode="nope")
