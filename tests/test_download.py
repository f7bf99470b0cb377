"""Tests for swallowctl.hub: planning, resumable downloads and errors, through the real
huggingface_hub client against the fake Hub of tests/hubserver.py (no network)."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hubserver import HubServer, use_hub

from swallowctl import hub
from swallowctl.core.errors import RuntimeFailure, UsageError
from swallowctl.hub import transfer

SWALLOW = "tokyotech-llm/Llama-3.1-Swallow-8B-Instruct-v0.5"
TWIN = "mlx-community/Llama-3.1-Swallow-8B-Instruct-v0.5-4bit"
GATED = "corp/gated-llm"
SHARDED = "someone/sharded"
WEIGHTS = "model.safetensors"
README = b"# Swallow (fixture)\n"
DUPLICATES = ("original/consolidated.00.pth", "pytorch_model.bin")
FAKE_TOKEN = "hf_" + "Zq7" * 12  # token-shaped; must never show up in any message or log


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """What a default download of the fixture repo brings: builtin:tiny-ja's files + README."""
    from swallowctl.core import tiny

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SWALLOWCTL_CACHE", str(tmp_path_factory.mktemp("tiny-cache")))
        folder = tiny.tiny_path()
    files = {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")}
    return {**files, "README.md": README}


@pytest.fixture
def server(
    tiny_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[HubServer]:
    repo = {
        **tiny_files,
        "original/consolidated.00.pth": b"\x80pickle" * 100,
        "pytorch_model.bin": b"\x80bin" * 100,
    }
    small = {k: tiny_files[k] for k in ("config.json", "tokenizer.json", "tokenizer_config.json")}
    shards = {
        "model-00001-of-00002.safetensors": b"a" * 50,
        "model-00002-of-00002.safetensors": b"b",
    }
    index = {"weight_map": {"w1": next(iter(shards)), "w2": list(shards)[1]}}
    hub_server = HubServer(
        repos={
            SWALLOW: repo,
            TWIN: {**small, WEIGHTS: b"mlx-4bit" * 64},
            GATED: {**small, WEIGHTS: b"gated" * 10},
            SHARDED: {
                **small,
                **shards,
                "model.safetensors.index.json": json.dumps(index).encode(),
            },
        },
        gated={GATED},
    )
    with hub_server:
        use_hub(monkeypatch, hub_server, tmp_path)
        monkeypatch.setattr(transfer, "_RETRY_WAIT_S", 0.0)
        yield hub_server


def resolve_gets(server: HubServer) -> list[tuple[str, str | None]]:
    """(file, Range) of every GET of file bytes the server saw."""
    return [
        (r.path.split("/resolve/")[1].split("/", 1)[1], r.range)
        for r in server.requests
        if r.method == "GET" and "/resolve/" in r.path
    ]


def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "hf-home" / "hub"


# ---- full download ------------------------------------------------------------------------


def test_full_download_is_byte_identical_and_loadable(
    server: HubServer, tmp_path: Path, tiny_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = hub.plan_download("swallow-8b")
    assert plan.repo_id == SWALLOW and plan.commit == server.commit(SWALLOW)
    assert plan.present_bytes == 0 and plan.remaining_bytes == plan.total_bytes
    seen: dict[str, tuple[int, int]] = {}
    result = hub.download(plan, on_progress=lambda p, done, total: seen.update({p: (done, total)}))

    snapshot = cache_dir(tmp_path) / f"models--{SWALLOW.replace('/', '--')}" / "snapshots"
    assert result.path == snapshot / plan.commit and result.commit == plan.commit
    assert sorted(result.files) == sorted(tiny_files)
    for name, data in tiny_files.items():
        assert (result.path / name).read_bytes() == data
        assert (result.path / name).is_symlink()  # the standard cache layout: links into blobs/
    assert not any((result.path / d).exists() for d in DUPLICATES)
    assert result.fetched_bytes == plan.total_bytes and result.resumed_bytes == 0
    assert seen[WEIGHTS] == (len(tiny_files[WEIGHTS]),) * 2
    refs = result.path.parent.parent / "refs" / "main"
    assert refs.read_text() == plan.commit

    status = hub.cache_status(SWALLOW)
    assert status.complete and status.missing == () and status.commit == plan.commit
    assert status.size_bytes == sum(len(d) for d in tiny_files.values())

    import torch
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(result.path)
    assert model.config.hidden_size > 0
    # transformers finds it by repo id in the same cache, offline: the layout is the standard one.
    server.requests.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    again = AutoModelForCausalLM.from_pretrained(SWALLOW)
    assert server.requests == []
    for (name, a), (_, b) in zip(
        model.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_second_run_requests_no_file_bytes(server: HubServer) -> None:
    hub.download(hub.plan_download())
    server.requests.clear()
    plan = hub.plan_download()
    assert plan.remaining_bytes == 0 and plan.present_bytes == plan.total_bytes
    result = hub.download(plan)
    assert resolve_gets(server) == []
    assert result.fetched_bytes == 0 and sorted(result.reused_files) == sorted(result.files)


def test_local_dir_download_and_reuse(
    server: HubServer, tmp_path: Path, tiny_files: dict[str, bytes]
) -> None:
    out = tmp_path / "out"
    result = hub.download(hub.plan_download(SWALLOW, local_dir=out))
    assert result.path == out.absolute()
    for name, data in tiny_files.items():
        assert (out / name).read_bytes() == data and not (out / name).is_symlink()
    assert not (cache_dir(tmp_path) / f"models--{SWALLOW.replace('/', '--')}" / "blobs").exists()
    server.requests.clear()
    assert hub.plan_download(SWALLOW, local_dir=out).remaining_bytes == 0
    hub.download(hub.plan_download(SWALLOW), local_dir=out)
    assert resolve_gets(server) == []


# ---- resume -----------------------------------------------------------------------------


def test_dropped_connection_resumes_on_the_next_run(
    server: HubServer, tmp_path: Path, tiny_files: dict[str, bytes]
) -> None:
    size = len(tiny_files[WEIGHTS])
    cut = size // 2 + 12345
    server.cut_at[(SWALLOW, WEIGHTS)] = cut  # the line keeps dropping at this byte
    plan = hub.plan_download()
    with pytest.raises(RuntimeFailure) as err:
        hub.download(plan)
    assert err.value.exit_code == 1 and "network error" in err.value.message
    assert err.value.hint is not None and "run the same command again" in err.value.hint
    sha = hashlib.sha256(tiny_files[WEIGHTS]).hexdigest()
    blobs = cache_dir(tmp_path) / f"models--{SWALLOW.replace('/', '--')}" / "blobs"
    assert (blobs / f"{sha}.incomplete").stat().st_size == cut  # kept for the next run
    assert not (blobs / sha).exists()
    status = hub.cache_status(SWALLOW)
    assert not status.complete and WEIGHTS in status.missing and status.partial_bytes == cut

    before = sorted(n for n in tiny_files if n < WEIGHTS)  # files go in name order
    after = sorted(n for n in tiny_files if n > WEIGHTS)
    assert all((status.snapshot or Path()).joinpath(n).is_file() for n in before)

    del server.cut_at[(SWALLOW, WEIGHTS)]  # the network is back
    server.requests.clear()
    plan = hub.plan_download()
    rest = sum(len(tiny_files[n]) for n in after)
    assert plan.remaining_bytes == size - cut + rest  # done files and the partial count as present
    result = hub.download(plan)
    assert (result.path / WEIGHTS).read_bytes() == tiny_files[WEIGHTS]
    # Only the missing tail of the weights, then the files never reached; nothing again.
    assert resolve_gets(server) == [(WEIGHTS, f"bytes={cut}-")] + [(n, None) for n in after]
    assert result.resumed_bytes == cut and result.fetched_bytes == size - cut + rest
    assert not (blobs / f"{sha}.incomplete").exists()


def test_local_dir_resumes_too(
    server: HubServer, tmp_path: Path, tiny_files: dict[str, bytes]
) -> None:
    out, cut = tmp_path / "out", 1_234_567
    server.cut_at[(SWALLOW, WEIGHTS)] = cut
    plan = hub.plan_download(include=[WEIGHTS], local_dir=out)
    with pytest.raises(RuntimeFailure, match="network error"):
        hub.download(plan)
    assert not (out / WEIGHTS).exists()
    partials = list((out / ".cache").rglob("*.incomplete"))
    assert [p.stat().st_size for p in partials] == [cut]
    server.cut_at.clear()
    server.requests.clear()
    assert hub.plan_download(include=[WEIGHTS], local_dir=out).present_bytes == cut
    hub.download(plan)
    assert (out / WEIGHTS).read_bytes() == tiny_files[WEIGHTS]
    assert resolve_gets(server) == [(WEIGHTS, f"bytes={cut}-")]


def test_drop_within_a_run_is_retried_with_range(
    server: HubServer, tiny_files: dict[str, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    server.fail_once[(SWALLOW, WEIGHTS)] = 1_000_000
    result = hub.download(hub.plan_download())
    assert (result.path / WEIGHTS).read_bytes() == tiny_files[WEIGHTS]
    assert [r for f, r in resolve_gets(server) if f == WEIGHTS] == [None, "bytes=1000000-"]
    assert "connection lost" in caplog.text


def test_corrupt_partial_is_detected_and_removed(
    server: HubServer, tmp_path: Path, tiny_files: dict[str, bytes]
) -> None:
    plan = hub.plan_download(include=[WEIGHTS])
    sha = plan.files[0].sha256
    blobs = cache_dir(tmp_path) / f"models--{SWALLOW.replace('/', '--')}" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{sha}.incomplete").write_bytes(b"garbage" * 10)  # not a prefix of the file
    with pytest.raises(RuntimeFailure, match="corrupted"):
        hub.download(plan)
    assert not (blobs / f"{sha}.incomplete").exists() and not (blobs / str(sha)).exists()
    assert (hub.download(plan).path / WEIGHTS).read_bytes() == tiny_files[WEIGHTS]


# ---- planning: dry run, excludes, patterns, names ---------------------------------------------


def test_dry_run_lists_files_and_size_and_fetches_nothing(
    server: HubServer, tmp_path: Path, tiny_files: dict[str, bytes]
) -> None:
    plan = hub.plan_download()
    assert sorted(f.path for f in plan.files) == sorted(tiny_files)
    assert plan.total_bytes == sum(len(d) for d in tiny_files.values())
    weights = next(f for f in plan.files if f.path == WEIGHTS)
    assert weights.size == len(tiny_files[WEIGHTS])
    assert weights.sha256 == hashlib.sha256(tiny_files[WEIGHTS]).hexdigest()
    assert next(f for f in plan.files if f.path == "config.json").sha256 is None
    assert resolve_gets(server) == []
    assert not cache_dir(tmp_path).exists()


def test_default_excludes_skip_duplicate_weights(server: HubServer) -> None:
    plan = hub.plan_download()
    skipped = {s.path: s.reason for s in plan.skipped}
    assert set(skipped) == {"original/consolidated.00.pth", "pytorch_model.bin"}
    assert "original/" in skipped["original/consolidated.00.pth"]
    assert ".safetensors" in skipped["pytorch_model.bin"]
    assert "README.md" in {f.path for f in plan.files}  # a decoy, but no weights: kept


def test_include_and_exclude_patterns(server: HubServer, tiny_files: dict[str, bytes]) -> None:
    jsons = hub.plan_download(include=["*.json"])
    assert sorted(f.path for f in jsons.files) == sorted(
        n for n in tiny_files if n.endswith("json")
    )
    assert {s.reason for s in jsons.skipped} == {"not matched by --include"}
    # An explicit --include wins over the duplicate-weight defaults.
    original = hub.plan_download(include=["original/"])
    assert [f.path for f in original.files] == ["original/consolidated.00.pth"]
    result = hub.download(original)
    assert (result.path / "original/consolidated.00.pth").read_bytes() == b"\x80pickle" * 100
    no_tok = hub.plan_download(exclude=["tokenizer*", "README.md"])
    assert not any(f.path.startswith(("tokenizer", "README")) for f in no_tok.files)
    assert WEIGHTS in {f.path for f in no_tok.files}

    with pytest.raises(UsageError, match="nothing to download") as err:
        hub.plan_download(include=["*.gguf"])
    assert err.value.exit_code == 2
    with pytest.raises(UsageError, match="both"):
        hub.plan_download(include=["*.json"], exclude=["*.json"])
    with pytest.raises(UsageError, match="nothing to download"):
        hub.plan_download(include=["*.json"], exclude=["*"])


def test_mlx_picks_the_twin(server: HubServer) -> None:
    assert hub.plan_download("swallow-8b", mlx=True).repo_id == TWIN
    assert hub.plan_download(mlx=True).repo_id == TWIN
    assert hub.plan_download(TWIN).repo_id == TWIN
    result = hub.download(hub.plan_download(mlx=True))
    assert (result.path / WEIGHTS).read_bytes() == b"mlx-4bit" * 64
    with pytest.raises(UsageError, match="--mlx needs a known model"):
        hub.plan_download(SHARDED, mlx=True)


def test_names_with_nothing_to_download_are_usage_errors(server: HubServer, tmp_path: Path) -> None:
    for name in ("builtin:tiny-ja", "tiny"):
        with pytest.raises(UsageError, match="built into swallowctl"):
            hub.plan_download(name)
    folder = tmp_path / "local-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="local folder"):
        hub.plan_download(str(folder))
    with pytest.raises(UsageError, match="unknown model 'swalow-8b'") as err:
        hub.plan_download("swalow-8b")
    assert err.value.hint is not None and "'swallow-8b'" in err.value.hint
    assert server.requests == []  # none of these asked the Hub


# ---- Hub errors ---------------------------------------------------------------------------


def test_gated_401_and_403_say_what_to_do_and_never_echo_the_token(
    server: HubServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RuntimeFailure) as err:
        hub.plan_download(GATED)
    assert err.value.exit_code == 1 and "gated" in err.value.message
    assert f"{server.url}/{GATED}" in err.value.message
    assert err.value.hint is not None and "hf auth login" in err.value.hint
    assert "HF_TOKEN" in err.value.hint

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)  # a token the server does not accept: 403
    with pytest.raises(RuntimeFailure) as err403:
        hub.plan_download(GATED)
    assert server.requests[-1].authorized
    assert "no access yet" in (err403.value.hint or "")

    server.allowed_tokens.add(FAKE_TOKEN)
    plan = hub.plan_download(GATED)
    monkeypatch.delenv("HF_TOKEN")  # the gate now bites at the file download itself
    with pytest.raises(RuntimeFailure, match="gated") as err_dl:
        hub.download(plan)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    assert (hub.download(plan).path / WEIGHTS).read_bytes() == b"gated" * 10

    texts = [caplog.text] + [f"{e.value.message} {e.value.hint}" for e in (err, err403, err_dl)]
    assert not any(FAKE_TOKEN in t for t in texts)


def test_unknown_repo_is_a_usage_error_with_a_suggestion(server: HubServer) -> None:
    with pytest.raises(UsageError) as err:
        hub.plan_download("tokyotech-llm/Llama-3.1-Swallow-8B-Instruct-v0.4")
    assert err.value.exit_code == 2 and "not found" in err.value.message
    assert server.url in err.value.message
    assert err.value.hint is not None and SWALLOW in err.value.hint


def test_bad_revision_is_a_usage_error_and_a_commit_works(server: HubServer) -> None:
    with pytest.raises(UsageError, match="no revision 'v9'") as err:
        hub.plan_download(revision="v9")
    assert err.value.exit_code == 2
    commit = server.commit(SWALLOW)
    plan = hub.plan_download(revision=commit)
    assert plan.commit == commit
    result = hub.download(plan)
    assert result.path.name == commit
    assert not (result.path.parent.parent / "refs" / commit).exists()  # no ref for a commit


def test_network_errors(server: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = hub.plan_download()
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", dead)
    with pytest.raises(RuntimeFailure, match="network error") as at_plan:
        hub.plan_download()
    assert dead in at_plan.value.message and at_plan.value.exit_code == 1
    plan = dataclasses.replace(plan, endpoint=dead)
    with pytest.raises(RuntimeFailure) as err:
        hub.download(plan)
    assert err.value.exit_code == 1 and "network error" in err.value.message
    assert "HF_ENDPOINT" in (err.value.hint or "") and "\n" not in err.value.message


def test_offline_with_a_complete_cache(server: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    online = hub.download(hub.plan_download())
    server.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plan = hub.plan_download("swallow-8b")
    assert plan.offline and plan.commit == online.commit and plan.remaining_bytes == 0
    assert sorted(f.path for f in plan.files) == sorted(online.files)
    result = hub.download(plan)
    assert result.path == online.path and result.fetched_bytes == 0
    assert server.requests == []


def test_offline_with_an_incomplete_cache(
    server: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.download(hub.plan_download(include=["*.json"]))  # no weights fetched
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    server.requests.clear()
    with pytest.raises(RuntimeFailure) as err:
        hub.plan_download()
    assert err.value.exit_code == 1 and "offline" in err.value.message
    assert WEIGHTS in err.value.message and "HF_HUB_OFFLINE" in (err.value.hint or "")
    with pytest.raises(RuntimeFailure, match="never downloaded"):
        hub.plan_download(mlx=True)
    assert server.requests == []


def test_not_enough_disk_space_fails_before_fetching(
    server: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = hub.plan_download()
    monkeypatch.setattr(transfer, "free_bytes", lambda path: plan.remaining_bytes)  # < margin
    with pytest.raises(RuntimeFailure, match="not enough disk space") as err:
        hub.download(plan)
    assert err.value.exit_code == 1 and "HF_HUB_CACHE" in (err.value.hint or "")
    assert resolve_gets(server) == []
    monkeypatch.setattr(
        transfer, "free_bytes", lambda path: plan.remaining_bytes + transfer.DISK_MARGIN
    )
    assert hub.download(plan).fetched_bytes == plan.total_bytes


def test_disk_full_while_writing_is_one_line(
    server: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object, **kwargs: object) -> tuple[int, int]:
        raise OSError(errno.ENOSPC, "No space left on device", "/cache/blobs/x.incomplete")

    monkeypatch.setattr(transfer, "_stream", full)
    with pytest.raises(RuntimeFailure, match="no space left") as err:
        hub.download(hub.plan_download())
    assert err.value.exit_code == 1 and "partial files are kept" in (err.value.hint or "")


def test_hf_home_alone_places_the_cache(
    server: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))  # set after import: still honoured
    result = hub.download(hub.plan_download(include=["*.json"]))
    assert result.path.is_relative_to(tmp_path / "elsewhere" / "hub")
    assert hub.cache_status(SWALLOW).cache_dir == tmp_path / "elsewhere" / "hub"


def test_unsafe_file_names_are_refused(server: HubServer) -> None:
    server.repos[SHARDED]["../../escape.json"] = b"{}"
    with pytest.raises(RuntimeFailure, match="unsafe file name"):
        hub.plan_download(SHARDED)


# ---- cache_status -------------------------------------------------------------------------


def test_cache_status_names_missing_shards(server: HubServer) -> None:
    empty = hub.cache_status(SHARDED)
    assert not empty.complete and empty.commit is None and empty.snapshot is None
    hub.download(hub.plan_download(SHARDED, exclude=["model-00002-of-00002.safetensors"]))
    status = hub.cache_status(SHARDED)
    assert status.commit == server.commit(SHARDED) and status.snapshot is not None
    assert status.missing == ("model-00002-of-00002.safetensors",) and not status.complete
    hub.download(hub.plan_download(SHARDED))
    assert hub.cache_status(SHARDED).complete
    assert hub.cache_status(SHARDED, revision=server.commit(SHARDED)).complete


# ---- the command line -----------------------------------------------------------------------


def test_cli_dry_run_then_download_then_doctor_sees_the_cache(
    server: HubServer, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from swallowctl.cli import app
    from swallowctl.core.config import load_config
    from swallowctl.doctor import run_doctor

    runner = CliRunner()
    r = runner.invoke(app, ["download", "swallow-8b", "--dry-run"])
    assert r.exit_code == 0, r.stderr
    assert "model.safetensors" in r.stdout
    assert "skipped original/consolidated.00.pth" in r.stdout
    assert resolve_gets(server) == []

    cfg = load_config(None).config
    before = {c.id: c for c in run_doctor(cfg, kernel_check=False).checks}["model"]
    assert before.status == "warn" and "not downloaded" in before.value

    r = runner.invoke(app, ["download", "swallow-8b", "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["commit"] == server.commit(SWALLOW)
    assert (Path(doc["path"]) / WEIGHTS).is_file()

    after = {c.id: c for c in run_doctor(cfg, kernel_check=False).checks}["model"]
    assert after.status == "ok" and "in the cache" in after.value


def test_cli_gated_is_one_line_exit_1(server: HubServer) -> None:
    from typer.testing import CliRunner

    from swallowctl.cli import app

    r = CliRunner().invoke(app, ["download", GATED])
    assert r.exit_code == 1
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "gated" in errors[0]
    assert "Traceback" not in r.stderr
