"""Tests for swallowctl.core.models: the registry, and resolving names offline, locally and on a
(fake) Hub served by tests/hubserver.py through the real huggingface_hub client."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hubserver import HubServer, use_hub

from swallowctl.core import models
from swallowctl.core.errors import RuntimeFailure, UsageError
from swallowctl.core.models import Architecture, lookup, resolve

SWALLOW = "tokyotech-llm/Llama-3.1-Swallow-8B-Instruct-v0.5"

# ---- registry ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "hub_id"),
    [
        ("swallow", SWALLOW),
        ("swallow-8b", SWALLOW),
        ("swallow-8b-v0.5", SWALLOW),
        ("  Swallow-8B ", SWALLOW),
        (SWALLOW.upper(), SWALLOW),
        ("swallow-8b-v0.3", "tokyotech-llm/Llama-3.1-Swallow-8B-Instruct-v0.3"),
        ("llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct"),
        ("qwen3-8b", "Qwen/Qwen3-8B"),
        ("qwen/qwen3-14b", "Qwen/Qwen3-14B"),
    ],
)
def test_names_resolve_offline_from_the_registry(name: str, hub_id: str) -> None:
    resolved = resolve(name)
    assert resolved.source == "registry"
    assert resolved.model_id == hub_id
    assert resolved.info is not None and resolved.info.hub_id == hub_id
    assert resolved.architecture == resolved.info.architecture
    assert resolved.name == name.strip()


def test_default_is_swallow_v05_with_its_mlx_twin() -> None:
    assert models.DEFAULT_MODEL == SWALLOW
    info = lookup(SWALLOW)
    assert info is not None and known_first() is info
    assert info.mlx_id == "mlx-community/Llama-3.1-Swallow-8B-Instruct-v0.5-4bit"
    # Asking for the MLX twin by its id loads that repo, with the same shape and tokens.
    twin = resolve(info.mlx_id)
    assert twin.model_id == info.mlx_id and twin.info is info


def known_first() -> models.ModelInfo:
    return models.known_models()[0]


# Published numbers, written out by hand (config.json of each model).
LLAMA_31_8B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "max_position_embeddings": 131072,
    "model_type": "llama",
}
QWEN3_8B = {
    "hidden_size": 4096,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 12288,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
    "max_position_embeddings": 40960,
    "model_type": "qwen3",
}
QWEN3_14B = {
    "hidden_size": 5120,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 17408,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
    "max_position_embeddings": 40960,
    "model_type": "qwen3",
}


@pytest.mark.parametrize(
    ("name", "expected"),
    [("llama-3.1-8b", LLAMA_31_8B), ("qwen3-8b", QWEN3_8B), ("qwen3-14b", QWEN3_14B)],
)
def test_architecture_numbers_are_as_published(name: str, expected: dict[str, Any]) -> None:
    info = lookup(name)
    assert info is not None and info.architecture is not None
    assert dataclasses.asdict(info.architecture) == expected
    # The same numbers come back when read from a config.json carrying them.
    assert Architecture.from_hf_config(expected) == info.architecture


def test_swallow_has_llama_31_8b_shape() -> None:
    for name in ("swallow-8b", "swallow-8b-v0.3"):
        arch = lookup(name).architecture  # type: ignore[union-attr]
        shape = {k: v for k, v in LLAMA_31_8B.items() if k != "max_position_embeddings"}
        assert {k: getattr(arch, k) for k in shape} == shape


def test_param_counts_and_kv_cache_match_published_figures() -> None:
    llama = Architecture(**LLAMA_31_8B)
    assert llama.param_count() == 8_030_261_248  # Llama 3.1 8B's safetensors total / 2 bytes
    assert llama.kv_cache_bytes_per_token() == 128 * 1024  # DESIGN.md: 128 KiB per token
    assert Architecture(**QWEN3_8B).param_count() == 8_190_735_360  # "8.2B" on the card
    assert round(Architecture(**QWEN3_14B).param_count() / 1e9, 1) == 14.8  # "14.8B"


def test_download_sizes_are_bf16_weights() -> None:
    for info in models.known_models():
        if info.architecture is None:
            assert info.download_bytes is None
            continue
        assert info.download_bytes == 2 * info.architecture.param_count(), info.key


@pytest.mark.parametrize("info", models.known_models(), ids=lambda i: i.key)
def test_entries_are_consistent(info: models.ModelInfo) -> None:
    assert info.pad_token_id not in info.stop_token_ids
    assert len(set(info.stop_token_ids)) == len(info.stop_token_ids)
    assert info.license and "\n" not in info.license
    assert info.description and "\n" not in info.description
    if info.architecture is not None:  # every real model has stop ids, a pad and a chat format
        assert info.stop_token_ids and info.pad_token_id is not None and info.pad_token
        assert info.chat_format in ("llama3", "chatml")
        assert info.pad_token_id < info.architecture.vocab_size
        assert all(i < info.architecture.vocab_size for i in info.stop_token_ids)
    for name in info.names:
        assert lookup(name) is info


def test_llama_and_qwen_token_facts() -> None:
    for name in ("swallow", "swallow-8b-v0.3", "llama-3.1-8b"):
        info = lookup(name)
        assert info is not None
        assert info.stop_token_ids == (128001, 128008, 128009)
        assert (info.pad_token_id, info.pad_token) == (128004, "<|finetune_right_pad_id|>")
        assert info.bos_token_id == 128000 and info.chat_format == "llama3"
    for name in ("qwen3-8b", "qwen3-14b"):
        info = lookup(name)
        assert info is not None
        assert set(info.stop_token_ids) == {151645, 151643}  # <|im_end|>, <|endoftext|>
        assert (info.pad_token_id, info.pad_token) == (151654, "<|vision_pad|>")
        assert info.chat_format == "chatml"
    assert lookup("llama-3.1-8b").gated  # type: ignore[union-attr]
    assert not lookup("qwen3-8b").gated  # type: ignore[union-attr]


def test_from_hf_config_defaults_and_nesting() -> None:
    old = {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "vocab_size": 1000,
        "head_dim": None,
    }
    arch = Architecture.from_hf_config(old)
    assert (arch.head_dim, arch.num_key_value_heads) == (16, 4)  # hidden/heads; plain MHA
    assert (arch.tie_word_embeddings, arch.max_position_embeddings) == (False, 0)
    nested = Architecture.from_hf_config({"model_type": "gemma3", "text_config": old})
    assert nested.hidden_size == 64 and nested.model_type == "gemma3"
    with pytest.raises(ValueError, match="vocab_size"):
        Architecture.from_hf_config({k: v for k, v in old.items() if k != "vocab_size"})


def test_unknown_name_suggests_a_close_alias() -> None:
    with pytest.raises(UsageError) as err:
        resolve("swalow-8b")
    assert "swalow-8b" in err.value.message
    assert err.value.hint is not None and "'swallow-8b'" in err.value.hint
    assert err.value.exit_code == 2
    assert models.close_matches("qwen3-8")[0] == "qwen3-8b"
    assert models.close_matches("qwen/qwen3-7b")[0] == "Qwen/Qwen3-8B"


@pytest.mark.parametrize("name", ["", "   ", "builtin:nope", "./no/such/folder"])
def test_bad_names_are_usage_errors(name: str) -> None:
    with pytest.raises(UsageError):
        resolve(name)


def test_importing_the_registry_stays_light() -> None:
    code = (
        "import sys; from swallowctl.core.models import resolve; resolve('swallow');"
        "print([m for m in ('torch', 'transformers', 'huggingface_hub', 'swallowctl.core.tiny')"
        " if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- local folders ----------------------------------------------------------------------

SMALL_QWEN = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_hidden_layers": 3,
    "intermediate_size": 96,
    "vocab_size": 300,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "eos_token_id": 7,
    "bos_token_id": 5,
}


def write_model(folder: Path, config: dict[str, Any], **files: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    for name, content in files.items():
        (folder / f"{name}.json").write_text(json.dumps(content))
    return folder


def test_local_folder_reads_its_files(tmp_path: Path) -> None:
    folder = write_model(
        tmp_path / "my-model",
        SMALL_QWEN,
        generation_config={"eos_token_id": [6, 7], "pad_token_id": 7},
        tokenizer_config={
            "pad_token": "<|pad|>",
            "added_tokens_decoder": {"9": {"content": "<|pad|>", "special": True}},
            "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}",
        },
    )
    resolved = resolve(str(folder))
    assert resolved.source == "local" and resolved.is_local and resolved.info is None
    assert resolved.model_id == str(folder.resolve())
    assert resolved.architecture == Architecture(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=96,
        vocab_size=300,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        model_type="qwen3",
    )
    assert resolved.stop_token_ids == (6, 7)  # generation_config first, config's 7 not repeated
    assert (resolved.pad_token_id, resolved.pad_token) == (9, "<|pad|>")
    assert resolved.bos_token_id == 5 and resolved.chat_format == "chatml"


def test_local_pad_that_is_a_stop_id_is_not_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = write_model(
        tmp_path / "m",
        {**SMALL_QWEN, "model_type": "mistral"},
        tokenizer_config={"pad_token": "</s>", "added_tokens_decoder": {"7": {"content": "</s>"}}},
    )
    (folder / "tokenizer.json").write_text(json.dumps({"added_tokens": []}))
    resolved = resolve(str(folder))
    assert resolved.stop_token_ids == (7,)
    assert resolved.pad_token_id is None and resolved.pad_token is None
    assert resolved.chat_format is None
    assert "stop id" in caplog.text


def test_hf_cache_snapshot_of_a_known_model_keeps_registry_tokens(tmp_path: Path) -> None:
    repo = "models--tokyotech-llm--Llama-3.1-Swallow-8B-Instruct-v0.5"
    snapshot = tmp_path / repo / "snapshots" / ("a" * 40)
    config = {**LLAMA_31_8B, "max_position_embeddings": 8192, "eos_token_id": [128001, 128009]}
    write_model(snapshot, config, generation_config={"eos_token_id": [128001, 128008, 128009]})
    resolved = resolve(str(snapshot))
    assert resolved.source == "local" and resolved.info is lookup("swallow")
    assert resolved.stop_token_ids == (128001, 128008, 128009)
    assert resolved.pad_token_id == 128004 and resolved.chat_format == "llama3"


def test_folder_without_config_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"no config\.json"):
        resolve(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(UsageError, match="not readable JSON"):
        resolve(str(bad))
    write_model(tmp_path / "enc", {"model_type": "bert", "hidden_size": 8})
    with pytest.raises(UsageError, match="num_attention_heads"):
        resolve(str(tmp_path / "enc"))


# ---- builtin ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("swallowctl-cache")


def test_builtin_tiny_resolves_from_its_built_files(
    tiny_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = pytest.importorskip("swallowctl.core.tiny")
    monkeypatch.setenv("SWALLOWCTL_CACHE", str(tiny_cache))
    assert (models.TINY_ID, models.TINY_REWARD_ID) == (tiny.TINY_ID, tiny.TINY_REWARD_ID)

    for name in (tiny.TINY_ID, "tiny", "TINY-JA"):
        resolved = resolve(name)
        assert resolved.source == "builtin" and resolved.info is lookup(tiny.TINY_ID)
    folder = Path(resolved.model_id)
    config = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    assert resolved.architecture == Architecture.from_hf_config(config)
    assert resolved.architecture.model_type == "llama"
    assert list(resolved.stop_token_ids) == generation["eos_token_id"]
    assert len(resolved.stop_token_ids) == 3  # Llama-3.1's three stop tokens
    assert resolved.pad_token == "<|finetune_right_pad_id|>"
    assert resolved.pad_token_id == config["pad_token_id"]
    assert resolved.pad_token_id not in resolved.stop_token_ids
    assert resolved.bos_token_id == config["bos_token_id"]
    assert resolved.chat_format == "llama3"

    reward = resolve(tiny.TINY_REWARD_ID)
    assert reward.source == "builtin" and reward.info is None
    assert reward.architecture.hidden_size == resolved.architecture.hidden_size
    assert reward.pad_token_id == resolved.pad_token_id


# ---- the (fake) Hub ---------------------------------------------------------------------

UNKNOWN = "someone/llama-3-ja-merge"
REMOTE_CONFIG = {
    "model_type": "llama",
    "hidden_size": 256,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "num_hidden_layers": 4,
    "intermediate_size": 512,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "bos_token_id": 128000,
    "eos_token_id": 128009,
}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    server = HubServer(
        repos={
            UNKNOWN: {
                "config.json": json.dumps(REMOTE_CONFIG).encode(),
                "generation_config.json": json.dumps({"eos_token_id": [128001, 128009]}).encode(),
                "model.safetensors": b"\0" * 64,
            },
            "someone/no-generation-config": {"config.json": json.dumps(REMOTE_CONFIG).encode()},
            "someone/not-a-model": {"README.md": b"# nothing here\n"},
            "corp/gated-llm": {"config.json": json.dumps(REMOTE_CONFIG).encode()},
        },
        gated={"corp/gated-llm"},
    )
    with server:
        use_hub(monkeypatch, server, tmp_path)
        yield server


def test_unknown_hub_id_reads_config_through_huggingface_hub(hub: HubServer) -> None:
    resolved = resolve(UNKNOWN)
    assert resolved.source == "hub-config" and resolved.info is None
    assert resolved.model_id == UNKNOWN and not resolved.is_local
    assert resolved.architecture == Architecture.from_hf_config(REMOTE_CONFIG)
    assert resolved.architecture.head_dim == 32
    assert resolved.stop_token_ids == (128001, 128009)  # generation_config's list
    assert resolved.pad_token_id is None  # nothing in its files: the caller must choose
    assert resolved.bos_token_id == 128000 and resolved.chat_format == "llama3"
    assert resolved.commit == hub.commit(UNKNOWN)
    fetched = {r.path for r in hub.requests if r.method == "GET"}
    assert f"/{UNKNOWN}/resolve/main/config.json" in fetched
    assert not any("safetensors" in r.path for r in hub.requests)  # only the small files


def test_cached_config_resolves_offline(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    online = resolve(UNKNOWN)
    seen = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after import: resolve() must still see it
    offline = resolve(UNKNOWN)
    assert offline.architecture == online.architecture
    assert offline.stop_token_ids == online.stop_token_ids
    assert len(hub.requests) == seen


def test_missing_generation_config_falls_back_to_config_eos(hub: HubServer) -> None:
    assert resolve("someone/no-generation-config").stop_token_ids == (128009,)


def test_hub_404_is_a_usage_error_with_suggestion(hub: HubServer) -> None:
    with pytest.raises(UsageError) as err:
        resolve("qwen/qwen3-7b")
    assert "qwen/qwen3-7b" in err.value.message and hub.url in err.value.message
    assert err.value.hint is not None and "'Qwen/Qwen3-8B'" in err.value.hint
    assert any(r.path.startswith("/qwen/qwen3-7b/") for r in hub.requests)


def test_hub_errors_become_one_line_swallow_errors(hub: HubServer) -> None:
    with pytest.raises(UsageError, match=r"has no config\.json"):
        resolve("someone/not-a-model")
    with pytest.raises(UsageError, match="no revision 'v9'"):
        resolve(UNKNOWN, revision="v9")
    with pytest.raises(RuntimeFailure, match="offline") as err:
        resolve("someone/no-generation-config", local_files_only=True)
    assert "\n" not in err.value.message


def test_gated_repo_says_accept_licence_and_log_in(
    hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(RuntimeFailure) as err:
        resolve("corp/gated-llm")
    assert "gated" in err.value.message and "corp/gated-llm" in err.value.message
    assert err.value.hint is not None and "hf auth login" in err.value.hint
    assert err.value.exit_code == 1

    fake = "hf_" + "Q" * 34  # a token the server does not accept: 403
    monkeypatch.setenv("HF_TOKEN", fake)
    with pytest.raises(RuntimeFailure) as err:
        resolve("corp/gated-llm")
    assert hub.requests[-1].authorized  # the token was sent...
    assert fake not in f"{err.value.message} {err.value.hint}"  # ...and never echoed

    hub.allowed_tokens.add(fake)
    assert resolve("corp/gated-llm").source == "hub-config"


def test_unreachable_hub_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    # A real unreachable endpoint costs ~23 s of huggingface_hub retries; fake its final error.
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*args: Any, **kwargs: Any) -> str:
        raise LocalEntryNotFoundError("connection refused")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(RuntimeFailure, match="could not reach the Hub"):
        resolve("someone/elsewhere")


def test_fake_hub_serves_snapshots_ranges_and_repo_info(hub: HubServer) -> None:
    """Guards the fixture the download tests reuse: the real client's snapshot and info calls."""
    import httpx2
    from huggingface_hub import HfApi, snapshot_download

    folder = Path(snapshot_download(UNKNOWN))
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert (folder / "model.safetensors").read_bytes() == b"\0" * 64
    assert folder.name == hub.commit(UNKNOWN)

    info = HfApi().model_info(UNKNOWN, files_metadata=True)
    sizes = {s.rfilename: s.size for s in info.siblings or []}
    assert info.sha == hub.commit(UNKNOWN) and sizes["model.safetensors"] == 64
    assert next(s for s in info.siblings or [] if s.rfilename == "model.safetensors").lfs

    url = f"{hub.url}/{UNKNOWN}/resolve/main/config.json"
    body = json.dumps(REMOTE_CONFIG).encode()
    part = httpx2.get(url, headers={"Range": "bytes=2-9"})
    assert part.status_code == 206 and part.content == body[2:10]
    assert part.headers["Content-Range"] == f"bytes 2-9/{len(body)}"
    assert httpx2.get(url, headers={"Range": f"bytes={len(body)}-"}).status_code == 416
    missing = httpx2.head(f"{hub.url}/nobody/nothing/resolve/main/config.json")
    assert (missing.status_code, missing.headers["X-Error-Code"]) == (404, "RepoNotFound")
