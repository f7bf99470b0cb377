"""`logging.report_to: [wandb]`, for real, in W&B's offline mode (nothing leaves the machine)."""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from swallowctl.cli import app
from swallowctl.core.config import load_config
from swallowctl.ppo import policy
from swallowctl.ppo.runlog import WANDB_ID
from swallowctl.ppo.trainer import PPOTrainer

pytest.importorskip("wandb")  # the `wandb` extra (the Makefile and CI install it)

SECRET = "sk-" + "SeCrEt" * 4
HF_SECRET = "hf_" + "SeCrEt" * 6
SMALL = (
    "model.name_or_path=builtin:tiny-ja",
    "generation.max_new_tokens=6",
    "ppo.per_device_train_batch_size=4",
    "ppo.grad_accum_steps=1",
    "ppo.ppo_epochs=1",
    "ppo.total_updates=2",
    "rewards.0.function=japanese_ratio",
    "logging.report_to=[wandb]",
    # A user section (kept for the user's own code) holding secrets, as real configs do.
    f"llm.api_key={SECRET}",
    "llm.endpoint=https://bob:pw-1234@llm.example.com/v1?key=qwerty",
    f"llm.note=token {HF_SECRET} pasted by mistake",
)


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of a `.wandb` file: W&B's LevelDB-style log (7-byte file header, 32 KiB
    blocks of chunks `crc32 u32, length u16, type u8`; type 1 = whole, 2-4 = first/middle/last)
    holding `wandb_internal_pb2.Record` protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HF_TOKEN", HF_SECRET)
    for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_an_offline_run_logs_the_masked_config_and_our_metrics(tmp_path: Path) -> None:
    run = tmp_path / "run"
    PPOTrainer(load_config(None, (*SMALL, f"output.dir={run}")).config).run()
    run_id = (run / WANDB_ID).read_text().strip()
    [wandb_file] = (run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    records = list(wandb_records(wandb_file))
    [meta] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (meta.project, meta.display_name) == ("swallowctl", "run")
    config = {u.key: json.loads(u.value_json) for u in meta.config.update}
    assert config["ppo"]["lr"] == 1e-5 and config["logging"]["report_to"] == ["wandb"]
    assert config["model"]["name_or_path"] == "builtin:tiny-ja"
    assert config["llm"] == {
        "api_key": "***",
        "endpoint": "https://llm.example.com/v1?key=...",
        "note": "***",
    }
    history = [
        {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    assert [h["update"] for h in history] == [1, 2]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for h, line in zip(history, lines, strict=True):
        for name in ("objective/scores", "objective/kl", "loss/value_avg", "policy/entropy_avg"):
            assert h[name] == pytest.approx(line[name]), name
    # final/manifest.json travels with the adapter: its config is masked the same way.
    manifest = json.loads((run / "final" / "manifest.json").read_text())
    assert manifest["config"]["llm"] == config["llm"]
    # Nothing W&B wrote holds a secret: not the config, not the command line, not the env.
    for path in [*(run / "wandb").rglob("*"), run / "final" / "manifest.json"]:
        if path.is_file():
            data = path.read_bytes()
            for secret in (SECRET, HF_SECRET, "pw-1234", "qwerty"):
                assert secret.encode() not in data, (path, secret)


def test_missing_wandb_is_one_line_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as if not installed

    def no_model(*_a: object, **_k: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(policy, "load_base", no_model)
    args = [f"--set={s}" for s in (*SMALL, f"output.dir={tmp_path / 'run'}")]
    r = CliRunner().invoke(app, ["train", *args])
    assert r.exit_code == 1, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors == ["error: logging.report_to: wandb needs wandb, which is not installed"]
    assert "pip install 'swallowctl[wandb]'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()
