"""Tests for `builtin:tiny-ja` (swallowctl/core/tiny.py): determinism, cache, and real loading in
transformers (fp32 and bitsandbytes 4-bit on CPU) and mlx-lm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from swallowctl.core import tiny
from swallowctl.core.errors import RuntimeFailure

REPO_ROOT = Path(tiny.__file__).resolve().parents[2]
EXPECTED_FILES = {
    "policy": {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    },
    "reward": {
        "config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    },
}
PROMPT = "A: ねえ、昨日のプリン食べたの誰？\nB: 私じゃないよ。"


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {kind: tiny.build_tiny(root / kind, kind) for kind in tiny.KINDS}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SWALLOWCTL_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def torch_policy(built: dict[str, Path]) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(built["policy"], output_loading_info=True)
    # Every tensor we write must be one transformers expects, and vice versa.
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval(), AutoTokenizer.from_pretrained(built["policy"])


# --- build & cache -------------------------------------------------------------------------------


def test_import_does_not_pull_heavy_modules() -> None:
    code = (
        "import sys, swallowctl.core.tiny\n"
        "heavy = [m for m in ('torch', 'tokenizers', 'safetensors', 'transformers', 'mlx')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=_subprocess_env())


def test_build_is_byte_identical(built: dict[str, Path], tmp_path: Path) -> None:
    for kind in tiny.KINDS:
        assert set(_files(built[kind])) == EXPECTED_FILES[kind]
        again = tiny.build_tiny(tmp_path / kind, kind)
        assert _files(again) == _files(built[kind]), kind
    # Another process has other hash seeds (tokenizers' Rust HashMaps): bytes and hash must hold.
    code = (
        "import sys; from pathlib import Path; from swallowctl.core import tiny\n"
        "tiny.build_tiny(Path(sys.argv[1]), 'policy'); print(tiny.build_hash())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "other")],
        check=True,
        capture_output=True,
        text=True,
        env=_subprocess_env(),
    )
    assert out.stdout.strip() == tiny.build_hash()
    assert _files(tmp_path / "other") == _files(built["policy"])


def test_build_hash_tracks_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    h = tiny.build_hash()
    assert len(h) == 12 and int(h, 16) >= 0
    assert tiny.build_hash() == h
    monkeypatch.setattr(tiny, "BUILD_VERSION", tiny.BUILD_VERSION + 1)
    assert tiny.build_hash() != h
    monkeypatch.undo()
    monkeypatch.setattr(tiny, "corpus_bytes", lambda: b"other text\n")
    assert tiny.build_hash() != h


def test_tiny_path_builds_once(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny.tiny_path()
    assert path == cache / f"tiny-ja-{tiny.build_hash()}" / "policy"
    assert EXPECTED_FILES["policy"] <= set(os.listdir(path))

    def no_rebuild(*args: object, **kwargs: object) -> Path:
        raise AssertionError("a cached build must not be rebuilt")

    monkeypatch.setattr(tiny, "build_tiny", no_rebuild)
    start = time.perf_counter()
    assert tiny.tiny_path() == path
    assert time.perf_counter() - start < 0.5
    assert tiny.builtin_path(tiny.TINY_ID) == path
    assert os.listdir(path.parent) == ["policy"]  # no temp dirs left behind


def test_tiny_path_loser_uses_winners_copy(
    cache: Path, monkeypatch: pytest.MonkeyPatch, built: dict[str, Path]
) -> None:
    real_build = tiny.build_tiny
    final = cache / f"tiny-ja-{tiny.build_hash()}" / "reward"

    def build_while_another_process_wins(out_dir: Path, kind: tiny.Kind = "policy") -> Path:
        real_build(out_dir, kind)
        # The "other process" publishes its complete copy just before our rename.
        real_build(final, kind)
        (final / ".swallowctl-complete").write_text("winner\n")
        return out_dir

    monkeypatch.setattr(tiny, "build_tiny", build_while_another_process_wins)
    assert tiny.tiny_path("reward") == final
    assert (final / ".swallowctl-complete").read_text() == "winner\n"
    assert os.listdir(final.parent) == ["reward"]  # the loser's temp dir is gone


def test_tiny_path_concurrent_threads(cache: Path) -> None:
    barrier = threading.Barrier(4)
    results: list[Path | BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            results.append(tiny.tiny_path("reward"))
        except BaseException as e:  # collected and re-checked below
            results.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(isinstance(r, Path) for r in results), results
    assert len(set(results)) == 1
    final = results[0]
    assert isinstance(final, Path)
    assert (final / ".swallowctl-complete").is_file()
    assert os.listdir(final.parent) == ["reward"]


def test_tiny_path_replaces_incomplete_dir(cache: Path, built: dict[str, Path]) -> None:
    final = cache / f"tiny-ja-{tiny.build_hash()}" / "policy"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{")  # half-written, no marker
    assert tiny.tiny_path() == final
    files = _files(final)
    files.pop(".swallowctl-complete")
    assert files == _files(built["policy"])
    assert os.listdir(final.parent) == ["policy"]


def test_bad_kind_and_unknown_builtin(cache: Path) -> None:
    with pytest.raises(ValueError):
        tiny.tiny_path("critic")  # type: ignore[arg-type]
    with pytest.raises(RuntimeFailure):
        tiny.builtin_path("builtin:tiny-en")
    assert not cache.exists()


# --- tokenizer -----------------------------------------------------------------------------------


def test_special_tokens_and_stop_ids(built: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built["policy"])
    config = json.loads((built["policy"] / "config.json").read_text())
    gen = json.loads((built["policy"] / "generation_config.json").read_text())

    assert len(tok) == config["vocab_size"] == 2048
    assert len(tok) % 64 == 0
    learned = len(tok) - len(tiny.SPECIAL_TOKENS)
    ids = tok.convert_tokens_to_ids(list(tiny.SPECIAL_TOKENS))
    assert ids == list(range(learned, len(tok)))  # Llama-3.1 order, right after the vocab

    stop_ids = tok.convert_tokens_to_ids(["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])
    assert gen["eos_token_id"] == config["eos_token_id"] == stop_ids
    assert tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|eot_id|>"
    assert tok.pad_token == "<|finetune_right_pad_id|>"
    assert tok.pad_token_id == gen["pad_token_id"] == config["pad_token_id"]
    assert tok.pad_token_id not in stop_ids
    assert gen["bos_token_id"] == config["bos_token_id"] == tok.bos_token_id
    assert (gen["do_sample"], gen["temperature"], gen["top_p"]) == (True, 0.7, 0.9)

    enc = tok("こんにちは").input_ids
    assert enc[0] == tok.bos_token_id and enc.count(tok.bos_token_id) == 1


@pytest.mark.parametrize(
    "text",
    [
        "今日はとても良い天気ですね。",
        "A: ねえ、昨日のプリン食べたの誰？\nB: 私じゃないよ。\nC: あ、ごめん。",
        "絵文字🍣や珍しい漢字「鬱」、半角ｶﾅ、全角　空白も 1 2 3 4 そのまま。",
        "  leading and trailing spaces , punctuation 's \t\n",
    ],
)
def test_roundtrip_is_lossless(built: dict[str, Path], text: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built["policy"])
    ids = tok(text).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids[1:]) == text


def test_bpe_learned_japanese(built: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built["policy"])
    text = "よろしくお願いいたします。ございます。"
    n = len(tok(text, add_special_tokens=False).input_ids)
    assert n < len(text.encode()) / 3  # well below one token per 3-byte character


def test_chat_template_matches_llama31_form(built: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built["policy"])
    messages = [
        {"role": "system", "content": "あなたは親切なアシスタントです。"},
        {"role": "user", "content": "自己紹介してください。"},
    ]
    expected = (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nあなたは親切なアシスタントです。<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n自己紹介してください。<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == expected
    closed = tok.apply_chat_template(
        [*messages, {"role": "assistant", "content": " はい。 "}], tokenize=False
    )
    assert closed == expected + "はい。<|eot_id|>"  # content is trimmed, as in Llama-3.1
    # Tokenizing the chat must not add a second BOS on top of the template's.
    ids = tok(rendered, add_special_tokens=False).input_ids
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


# --- models --------------------------------------------------------------------------------------


def test_weights_quantizable_with_group_64(built: dict[str, Path]) -> None:
    from safetensors import safe_open

    with safe_open(built["policy"] / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            t = f.get_tensor(name)
            assert str(t.dtype) == "torch.float32"
            assert all(d % 64 == 0 for d in t.shape), (name, t.shape)


def test_torch_generate_stops_on_llama31_ids(torch_policy: tuple[Any, Any]) -> None:
    import torch

    model, tok = torch_policy
    stop_ids = list(model.generation_config.eos_token_id)
    assert tok.convert_ids_to_tokens(stop_ids) == list(tiny.STOP_TOKENS)
    enc = tok(PROMPT, return_tensors="pt")
    out = model.generate(
        **enc,
        max_new_tokens=5,
        do_sample=False,
        eos_token_id=stop_ids,
        pad_token_id=tok.pad_token_id,
    )
    new = out[0, enc.input_ids.shape[1] :].tolist()
    assert 1 <= len(new) <= 5 and all(0 <= i < len(tok) for i in new)
    torch.manual_seed(0)
    sampled = model.generate(**enc, max_new_tokens=5)  # generation_config: sampling, stop ids
    assert sampled.shape[1] > enc.input_ids.shape[1]


def test_bnb_4bit_on_cpu(built: dict[str, Path], torch_policy: tuple[Any, Any]) -> None:
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model, tok = torch_policy
    qconfig = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    qmodel = AutoModelForCausalLM.from_pretrained(
        built["policy"], quantization_config=qconfig, device_map={"": "cpu"}
    )
    layer = qmodel.model.layers[0]
    for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.down_proj):
        assert isinstance(linear, bnb.nn.Linear4bit)
        assert linear.weight.quant_state.quant_type == "nf4"
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
        got = qmodel(ids).logits
    assert torch.isfinite(got).all()
    assert not torch.equal(got, ref)  # it really is quantized
    # NF4 rounding: logits stay close in direction and size (seen: cos 0.99, worst error about a
    # quarter of the largest logit, which is ~6 with the 0.2-std head).
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert cos > 0.95
    assert (got - ref).abs().max() < 0.4 * ref.abs().max()


def test_mlx_matches_torch(built: dict[str, Path], torch_policy: tuple[Any, Any]) -> None:
    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    import numpy as np
    import torch

    model, tok = torch_policy
    mmodel, mtok = mlx_lm.load(str(built["policy"]))
    assert set(mtok.eos_token_ids) == set(model.generation_config.eos_token_id)

    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    got = np.array(mmodel(mx.array(ids.numpy())).astype(mx.float32))
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-4

    # Greedy decoding picks the same tokens on both backends.
    mlx_tokens = [r.token for r in mlx_lm.stream_generate(mmodel, mtok, PROMPT, max_tokens=4)]
    assert 1 <= len(mlx_tokens) <= 4
    out = model.generate(
        ids,
        max_new_tokens=4,
        do_sample=False,
        eos_token_id=list(mtok.eos_token_ids),
        pad_token_id=tok.pad_token_id,
    )
    assert out[0, ids.shape[1] :].tolist()[: len(mlx_tokens)] == mlx_tokens
    assert isinstance(mlx_lm.generate(mmodel, mtok, PROMPT, max_tokens=3), str)

    # Every Linear and the embedding quantize with group size 64 (what `mlx_lm convert -q` does).
    import mlx.nn as nn

    nn.quantize(mmodel, group_size=64, bits=4)
    assert isinstance(mmodel.model.layers[0].self_attn.k_proj, nn.QuantizedLinear)
    assert isinstance(mmodel.lm_head, nn.QuantizedLinear)
    qgot = np.array(mmodel(mx.array(ids.numpy())).astype(mx.float32))
    assert np.isfinite(qgot).all() and np.abs(qgot - ref).max() < 0.4 * np.abs(ref).max()


def test_reward_model_scores_each_sequence(built: dict[str, Path]) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm, info = AutoModelForSequenceClassification.from_pretrained(
        built["reward"], output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert rm.config.num_labels == 1 and rm.config.pad_token_id is not None
    tok = AutoTokenizer.from_pretrained(built["reward"])
    texts = ["ありがとうございます。", "A: ごめんね。\nB: いいよ、気にしないで。仲直りしよう。"]
    batch = tok(texts, return_tensors="pt", padding=True)
    assert (batch.input_ids == tok.pad_token_id).any()  # the short one really is padded
    with torch.no_grad():
        scores = rm(**batch).logits
        solo = torch.cat([rm(**tok(t, return_tensors="pt")).logits for t in texts])
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()
    # Padding must not change a sequence's score: the pad id is what marks the last real token.
    torch.testing.assert_close(scores, solo, atol=1e-5, rtol=1e-4)
    assert scores[0] != scores[1]

    # Same seed per tensor name: the reward backbone equals the policy's bit for bit.
    policy = load_file(built["policy"] / "model.safetensors")
    reward = load_file(built["reward"] / "model.safetensors")
    assert set(reward) - set(policy) == {"score.weight"}
    assert all(torch.equal(reward[k], policy[k]) for k in reward if k != "score.weight")
