"""`swallowctl infer` on real backends: PyTorch and MLX (mlx[cpu] runs on Linux) on builtin:tiny-ja.

Agreement is checked token for token under greedy decoding and, under teacher forcing, logit for
logit within LOGIT_ATOL. Batches are interrupted and resumed; the chat runs in a pseudo-terminal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pty
import select
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from swallowctl import __version__
from swallowctl.cli import app
from swallowctl.core.config import SwallowConfig, dump_config
from swallowctl.core.errors import DataError, UsageError
from swallowctl.core.models import ResolvedModel, resolve
from swallowctl.core.modes import BUILTIN_MODES, ModeSpec
from swallowctl.infer import (
    GenerationSettings,
    IncrementalDecoder,
    Response,
    batch,
    choose_model,
    collect,
    open_backend,
    read_adapter,
    session,
)
from swallowctl.infer.mlx_backend import MlxBackend
from swallowctl.infer.torch_backend import TorchBackend

TINY = "builtin:tiny-ja"
# fp32 on both sides, same weights: observed max |torch - mlx| is ~6e-7 on logits of magnitude
# ~1; 1e-4 leaves room for other CPUs' kernels while a wrong RoPE or LoRA scale is off by >1e-2.
LOGIT_ATOL = 1e-4
PROMPTS = ["こんにちは", "日本の首都はどこですか？", "Hello, how are you?", "今日は雨です。"]
GREEDY = GenerationSettings(greedy=True, max_new_tokens=24)
runner = CliRunner()


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def make_adapter(directory: Path, *, seed: int = 0, manifest: bool = True) -> Path:
    """A peft LoRA on tiny-ja laid out like `swallowctl train`'s RUN/final, B non-zero."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = resolve(TINY).model_id
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # peft starts B at zero (a no-op adapter); make it change outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(directory)
    if manifest:
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(directory)
        info = {
            "swallowctl": __version__,
            "algorithm": "ppo",
            "base_model": {"name": TINY, "model_id": base_dir, "revision": None, "commit": None},
            "updates": 3,
            "metrics": {"objective/scores": 0.5},
            "config": dump_config(SwallowConfig()),
        }
        (directory / "manifest.json").write_text(json.dumps(info), encoding="utf-8")
    return directory


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """The tiny model gains nothing from threads, and on a busy shared CPU torch's spinning
    OpenMP workers made a one-second test take twenty-five."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny() -> ResolvedModel:
    return resolve(TINY)


@pytest.fixture(scope="module")
def torch_tiny(tiny: ResolvedModel) -> TorchBackend:
    return TorchBackend.load(tiny, SwallowConfig())


@pytest.fixture(scope="module")
def mlx_tiny(tiny: ResolvedModel) -> MlxBackend:
    return MlxBackend.load(tiny, tiny.model_id)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tmp_path_factory.mktemp("run") / "final")


@pytest.fixture
def mlx_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import swallowctl.infer.mlx_backend as mb

    monkeypatch.setattr(mb, "cache_dir", lambda: tmp_path / "mlx-adapters")
    return tmp_path / "mlx-adapters"


# --- the two backends agree -------------------------------------------------------------------


def test_torch_and_mlx_same_greedy_tokens_and_logits(
    torch_tiny: TorchBackend, mlx_tiny: MlxBackend
) -> None:
    for text in PROMPTS:
        messages = chat(text)
        assert torch_tiny.prompt_ids(messages) == mlx_tiny.prompt_ids(messages)
        a = collect(torch_tiny.stream_generate(messages, GREEDY))
        b = collect(mlx_tiny.stream_generate(messages, GREEDY))
        assert a.token_ids == b.token_ids, text
        assert a.text == b.text
        assert len(a.token_ids) == GREEDY.max_new_tokens and a.finish_reason == "length"
        forced = torch_tiny.prompt_ids(messages) + a.token_ids
        la, lb = torch_tiny.logits(forced), mlx_tiny.logits(forced)
        assert la.shape == lb.shape == (len(forced), 2048)
        np.testing.assert_allclose(la, lb, atol=LOGIT_ATOL, rtol=0)


def test_every_stop_id_stops_both_backends(tiny: ResolvedModel, torch_tiny: TorchBackend) -> None:
    """An id that only the resolved model lists (not config.json) must stop MLX as well."""
    free = collect(torch_tiny.stream_generate(chat(PROMPTS[0]), GREEDY)).token_ids
    stop_at = next(i for i in range(3, len(free)) if free[i] not in free[:i])
    extra = dataclasses.replace(tiny, stop_token_ids=(*tiny.stop_token_ids, free[stop_at]))
    for backend in (
        TorchBackend.load(extra, SwallowConfig()),
        MlxBackend.load(extra, tiny.model_id),
    ):
        done = collect(backend.stream_generate(chat(PROMPTS[0]), GREEDY))
        assert done.token_ids == free[:stop_at], backend.name
        assert done.finish_reason == "stop"


def test_left_padded_batch_equals_streaming(torch_tiny: TorchBackend) -> None:
    batch = [chat(p) for p in PROMPTS]  # prompts of different lengths: real padding
    rows = torch_tiny.generate_batch(batch, GREEDY)
    for messages, row in zip(batch, rows, strict=True):
        alone = collect(torch_tiny.stream_generate(messages, GREEDY))
        assert row.token_ids == alone.token_ids
        assert row.text == alone.text


def test_sampling_is_seeded_and_responses_count_up(torch_tiny: TorchBackend) -> None:
    settings = GenerationSettings(max_new_tokens=10, seed=7)
    runs = [list(torch_tiny.stream_generate(chat("こんにちは"), settings)) for _ in range(2)]
    assert [r.token for r in runs[0]] == [r.token for r in runs[1]]
    steps = [r for r in runs[0] if r.token is not None]
    assert [r.tokens for r in steps] == list(range(1, len(steps) + 1))
    assert runs[0][-1].finish_reason in ("stop", "length")
    assert all(isinstance(r, Response) and r.peak_memory_gb > 0 for r in runs[0])


def test_mlx_samples_from_the_same_nucleus_as_transformers() -> None:
    """Temperature before top_p on both backends (mlx-lm's own order is the other way round)."""
    import mlx.core as mx
    import torch
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    from swallowctl.infer.mlx_backend import make_mlx_sampler

    logits = np.random.default_rng(0).normal(0, 2, 512).astype(np.float32)
    tempered = TemperatureLogitsWarper(0.7)(None, torch.from_numpy(logits)[None])
    warped = TopPLogitsWarper(0.9)(None, tempered)  # transformers' order: temperature first
    nucleus = set(np.flatnonzero(np.isfinite(warped[0].numpy())).tolist())
    mx.random.seed(0)
    sampler = make_mlx_sampler(GenerationSettings(temperature=0.7, top_p=0.9))
    logprobs = mx.array(logits)[None] - mx.logsumexp(mx.array(logits))
    drawn = {int(sampler(logprobs).item()) for _ in range(2000)}
    assert drawn <= nucleus and len(drawn) > len(nucleus) // 2


def test_incremental_decoder_never_splits_a_character(torch_tiny: TorchBackend) -> None:
    text = "日本語の文章を一文字ずつ流しても、文字化けしません。🍣 OK"
    ids = torch_tiny.tokenizer.encode(text, add_special_tokens=False)
    decoder = IncrementalDecoder(torch_tiny.tokenizer)
    pieces = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


# --- adapters ---------------------------------------------------------------------------------


def test_peft_adapter_on_mlx_converted_once_matches_torch(
    tiny: ResolvedModel, torch_tiny: TorchBackend, adapter_dir: Path, mlx_cache: Path
) -> None:
    info = read_adapter(adapter_dir.parent)  # RUN_DIR works too: final/ is picked
    assert info.format == "peft" and info.base_name == TINY and info.path == adapter_dir
    resolved, load_id = choose_model(None, info, SwallowConfig(), backend="mlx")
    assert resolved.model_id == tiny.model_id and load_id == tiny.model_id
    cfg = SwallowConfig()
    tuned_torch = open_backend("torch", resolved, load_id, cfg, info)
    tuned_mlx = open_backend("mlx", resolved, load_id, cfg, info)
    assert len(list(mlx_cache.iterdir())) == 1
    open_backend("mlx", resolved, load_id, cfg, info)  # second open: the cached conversion
    assert len(list(mlx_cache.iterdir())) == 1
    for text in PROMPTS[:3]:
        a = collect(tuned_torch.stream_generate(chat(text), GREEDY))
        b = collect(tuned_mlx.stream_generate(chat(text), GREEDY))
        base = collect(torch_tiny.stream_generate(chat(text), GREEDY))
        assert a.token_ids == b.token_ids
        assert a.token_ids != base.token_ids  # the adapter really changes the answer
        forced = tuned_torch.prompt_ids(chat(text)) + a.token_ids
        np.testing.assert_allclose(
            tuned_torch.logits(forced), tuned_mlx.logits(forced), atol=LOGIT_ATOL, rtol=0
        )


def test_checkpoint_without_manifest_uses_adapter_config_base(tmp_path: Path) -> None:
    ckpt = make_adapter(tmp_path / "checkpoint-2", manifest=False)
    info = read_adapter(ckpt)
    assert info.manifest is None and info.base_name == resolve(TINY).model_id
    resolved, _ = choose_model(None, info, SwallowConfig(), backend="torch")
    assert resolved.model_id == resolve(TINY).model_id


def test_bad_adapter_folders_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such folder"):
        read_adapter(tmp_path / "nope")
    with pytest.raises(UsageError, match=r"no adapter_config\.json"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(UsageError, match="pickle"):
        read_adapter(tmp_path)


# --- settings and modes -----------------------------------------------------------------------


def test_settings_defaults_flags_and_greedy_choice_modes() -> None:
    cfg = SwallowConfig()
    chat_mode = session.resolve_mode(cfg, "chat", None)
    s = session.resolve_settings(cfg, chat_mode)
    assert (s.temperature, s.top_p, s.max_new_tokens, s.is_greedy) == (0.7, 0.9, 512, False)
    intervention = session.resolve_mode(cfg, "intervention", "SYS")
    assert intervention.system == "SYS" and intervention.choices
    assert session.resolve_settings(cfg, intervention).is_greedy
    assert not session.resolve_settings(cfg, intervention, temperature=0.5).is_greedy
    assert session.resolve_settings(cfg, chat_mode, temperature=0.0).is_greedy
    with pytest.raises(UsageError, match="contradicts"):
        session.resolve_settings(cfg, chat_mode, greedy=True, temperature=0.3)
    with pytest.raises(UsageError, match="unknown mode"):
        session.resolve_mode(cfg, "nope", None)


# --- batches ----------------------------------------------------------------------------------


def write_input(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [
        {"prompt": "こんにちは", "id": "a"},
        {"messages": [{"role": "user", "content": "日本の首都は？"}], "id": "b", "gold": 1},
        {"prompt": "Hello", "id": "c"},
        {"prompt": "今日は雨です。", "id": "d"},
        {"prompt": "ありがとう", "id": "e"},
    ]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines.insert(2, "")  # blank lines are skipped; line numbers stay the file's
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return rows


def read_output(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_batch_limit_interrupt_torn_line_and_resume(
    tmp_path: Path, torch_tiny: TorchBackend
) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = write_input(src)
    mode, settings = BUILTIN_MODES["chat"], GenerationSettings(greedy=True, max_new_tokens=6)

    plan = batch.plan_batch(src, out, mode)
    first = batch.run_batch(torch_tiny, plan, mode, settings, batch_size=2, limit=2)
    assert (first.written, first.remaining) == (2, 3)

    def stop_after_one_batch(rows_done: int, tokens: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        batch.run_batch(
            torch_tiny,
            batch.plan_batch(src, out, mode),
            mode,
            settings,
            batch_size=1,
            on_rows=stop_after_one_batch,
        )
    assert len(read_output(out)) == 3
    with out.open("a", encoding="utf-8") as f:
        f.write('{"prompt": "Hello", "id": "c", "respo')  # a write cut short by a crash
    plan = batch.plan_batch(src, out, mode)
    assert len(plan.done) == 3 and len(plan.todo) == 2
    last = batch.run_batch(torch_tiny, plan, mode, settings, batch_size=4)
    assert (last.skipped, last.written, last.remaining) == (3, 2, 0)

    done = read_output(out)
    assert sorted(r["_line"] for r in done) == [1, 2, 4, 5, 6]
    assert sorted(r["id"] for r in done) == [r["id"] for r in rows]
    b = next(r for r in done if r["id"] == "b")
    assert b["gold"] == 1 and b["messages"] == rows[1]["messages"]  # other columns kept
    system = {"role": "system", "content": mode.system}  # a messages row gets the mode's
    alone = collect(torch_tiny.stream_generate([system, *rows[1]["messages"]], settings))
    assert b["response"] == alone.text and b["tokens"] == len(alone.token_ids)
    assert (
        batch.run_batch(torch_tiny, batch.plan_batch(src, out, mode), mode, settings).written == 0
    )


def test_batch_refuses_output_of_another_input(tmp_path: Path, torch_tiny: TorchBackend) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src)
    mode, settings = BUILTIN_MODES["chat"], GenerationSettings(greedy=True, max_new_tokens=2)
    batch.run_batch(torch_tiny, batch.plan_batch(src, out, mode), mode, settings, limit=1)
    assert batch.plan_batch(src, out, mode).done == {1}
    with pytest.raises(DataError, match="has changed"):  # same rows, another system prompt
        batch.plan_batch(src, out, mode.model_copy(update={"system": "別の指示"}))
    src.write_text(src.read_text(encoding="utf-8").replace("こんにちは", "さようなら"))
    with pytest.raises(DataError, match="has changed"):
        batch.plan_batch(src, out, mode)
    src.write_text('{"prompt": "x"}\n{"nothing": 1}\n')
    with pytest.raises(DataError, match=r"in\.jsonl:2:"):
        batch.plan_batch(src, tmp_path / "new.jsonl", mode)


class ScriptedBackend:
    """Answers from a list, recording what it was asked (session logic without a model)."""

    name = "torch"
    model_name = "scripted"
    stop_token_ids = (0,)

    def __init__(self, answers: list[str], interrupt_after: int | None = None) -> None:
        self.answers = answers
        self.asked: list[list[dict[str, str]]] = []
        self.interrupt_after = interrupt_after

    def stream_generate(self, messages: Any, settings: Any) -> Iterator[Response]:
        self.asked.append(messages)
        text = self.answers[(len(self.asked) - 1) % len(self.answers)]
        for i, ch in enumerate(text):
            if self.interrupt_after is not None and i == self.interrupt_after:
                raise KeyboardInterrupt
            yield Response(ch, i + 1, i + 1, 10.0, 0.1)
        yield Response("", None, len(text), 10.0, 0.1, "stop")

    def generate_batch(self, batch: Any, settings: Any) -> list[Any]:
        return [collect(self.stream_generate(m, settings)) for m in batch]


def test_choice_modes_label_and_mark_rows(tmp_path: Path) -> None:
    mode = BUILTIN_MODES["intervention"]
    src, out = tmp_path / "obs.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"prompt": "A: ..."}\n{"prompt": "B: ..."}\n{"prompt": "C: ..."}\n')
    backend = ScriptedBackend(["2", "えっと", "4\n理由: 様子見"])
    result = batch.run_batch(backend, batch.plan_batch(src, out, mode), mode, GREEDY)  # type: ignore[arg-type]
    assert result.no_choice == 1
    got = [(r["choice"], r["label"], r["valid_choice"]) for r in read_output(out)]
    assert got == [("2", "bridge", True), (None, None, False), ("4", "no_intervention", True)]
    assert backend.asked[0][0]["role"] == "system"  # the mode's system prompt comes first
    ans = session.answer(backend, chat("x"), GREEDY, mode)  # type: ignore[arg-type]
    assert ans.to_json()["label"] == "bridge"
    assert session.choice_line("えっと", mode).startswith("no valid choice")


def test_repl_keeps_history_resets_and_survives_ctrl_c() -> None:
    lines = iter(["こんにちは", "/system 短く答えて", "続けて", "/reset", "もう一度", "/exit"])
    backend = ScriptedBackend(["はい。", "いいえ。"])
    repl = session.ChatRepl(backend, BUILTIN_MODES["chat"], GREEDY, read=lambda _: next(lines))  # type: ignore[arg-type]
    repl.run()
    first, second, third = backend.asked
    assert [m["role"] for m in first] == ["system", "user"]
    assert second[0]["content"] == "短く答えて"
    assert [m["content"] for m in second[1:]] == ["こんにちは", "はい。", "続けて"]
    assert [m["role"] for m in third] == ["system", "user"]  # /reset forgot the conversation
    stopping = ScriptedBackend(["長い答えです"], interrupt_after=2)
    lines = iter(["a", "b"])
    repl = session.ChatRepl(stopping, BUILTIN_MODES["chat"], GREEDY, read=lambda _: next(lines))  # type: ignore[arg-type]
    with pytest.raises(StopIteration):  # the reader ran dry: the REPL itself never stopped
        repl.run()
    assert stopping.asked[1][-2] == {"role": "assistant", "content": "長い"}


# --- the real terminal --------------------------------------------------------------------------


def _read_until(fd: int, marker: bytes, timeout: float = 60.0) -> bytes:
    buf, deadline = b"", time.monotonic() + timeout
    while marker not in buf:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"timed out waiting for {marker!r}; got {buf[-400:]!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        buf += chunk
    return buf


def _wait(pid: int, fd: int, timeout: float = 30.0) -> int:
    """The child's exit code, draining its output meanwhile (a full pty would block it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if select.select([fd], [], [], 0.1)[0]:
            with contextlib.suppress(OSError):  # EIO once the child closed the terminal
                os.read(fd, 4096)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError("the REPL did not exit")


def test_repl_in_a_pseudo_terminal() -> None:
    argv = [
        sys.executable,
        "-m",
        "swallowctl",
        "infer",
        "--model",
        TINY,
        "--greedy",
        "--max-new-tokens",
        "6",
        "--quiet",
    ]
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI on a real terminal
        os.execve(sys.executable, argv, {**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _read_until(fd, b">>> ")
        for line in ("こんにちは", "もう一つ", "/reset"):
            os.write(fd, line.encode() + b"\r")
            _read_until(fd, b">>> ")
        os.write(fd, b"/exit\r")
        assert _wait(pid, fd) == 0
    finally:
        os.close(fd)


def test_ctrl_c_at_the_prompt_exits_cleanly() -> None:
    argv = [
        sys.executable,
        "-m",
        "swallowctl",
        "infer",
        "--backend",
        "mlx",
        "--model",
        TINY,
        "--quiet",
    ]
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(sys.executable, argv, {**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _read_until(fd, b">>> ")
        os.write(fd, b"\x03")  # the terminal turns it into SIGINT
        assert _wait(pid, fd) == 0
    finally:
        os.close(fd)


# --- the command line -------------------------------------------------------------------------


def test_cli_mlx_prompt_streams_an_answer() -> None:
    r = runner.invoke(
        app,
        [
            "infer",
            "--backend",
            "mlx",
            "--model",
            TINY,
            "--prompt",
            "こんにちは",
            "--max-new-tokens",
            "8",
            "--seed",
            "1",
        ],
    )
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip()


def test_cli_json_and_batch(tmp_path: Path, torch_tiny: TorchBackend) -> None:
    r = runner.invoke(
        app,
        [
            "infer",
            "--model",
            TINY,
            "--prompt",
            "こんにちは",
            "--greedy",
            "--max-new-tokens",
            "5",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) >= {"text", "tokens", "tokens_per_s", "backend", "model"}
    five = GenerationSettings(greedy=True, max_new_tokens=5)
    messages = session.messages_for("こんにちは", BUILTIN_MODES["chat"])  # system prompt too
    assert doc["text"] == collect(torch_tiny.stream_generate(messages, five)).text
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src)
    args = [
        "infer",
        "--model",
        TINY,
        "--mode",
        "intervention",
        "--input",
        str(src),
        "--output",
        str(out),
        "--max-new-tokens",
        "3",
        "--json",
    ]
    r = runner.invoke(app, [*args, "--limit", "2"])
    assert r.exit_code == 0, r.stderr  # rows with no valid choice are marked, not fatal
    assert json.loads(r.stdout)["written"] == 2
    r = runner.invoke(app, args)
    assert (json.loads(r.stdout)["skipped"], json.loads(r.stdout)["remaining"]) == (2, 0)
    assert all("valid_choice" in row for row in read_output(out))


def test_cli_mlx_missing_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlx", None)
    r = runner.invoke(app, ["infer", "--backend", "mlx", "--model", TINY, "--prompt", "x"])
    assert r.exit_code == 1
    assert "pip install 'swallowctl[mlx]'" in r.stderr and "mlx[cpu]" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--prompt", "x", "--input", "a.jsonl", "--output", "b.jsonl"], "--prompt and --input"),
        (["--output", "b.jsonl"], "--output needs --input"),
        (["--greedy", "--temperature", "0.5", "--prompt", "x"], "contradicts"),
        (["--json"], "--json needs --prompt or --input"),
        (["--mode", "nope", "--prompt", "x"], "unknown mode 'nope'"),
        (["--top-p", "1.5", "--prompt", "x"], "--top-p 1.5"),
    ],
)
def test_cli_bad_flags_exit_2_with_one_line(args: list[str], fragment: str) -> None:
    r = runner.invoke(app, ["infer", "--model", TINY, *args])
    assert r.exit_code == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0]
    assert r.stdout == ""


def test_plain_messages_mode_with_custom_template() -> None:
    mode = ModeSpec(system=None, template="質問: {prompt}")
    assert session.messages_for("猫", mode) == [{"role": "user", "content": "質問: 猫"}]
