"""`swallowctl export`: one trained adapter, three exports, the same greedy answers everywhere.

torch + peft, MLX + the `mlx-adapter` export and torch on the `merged` export must pick identical
tokens; the quantized `mlx` export must load and generate with mlx_lm itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_infer import GREEDY, LOGIT_ATOL, PROMPTS, TINY, chat, make_adapter
from test_infer import one_torch_thread as one_torch_thread  # autouse: one torch thread here too
from typer.testing import CliRunner

from swallowctl.cli import app
from swallowctl.core.config import SwallowConfig
from swallowctl.core.errors import UsageError
from swallowctl.core.models import resolve
from swallowctl.export import export, peft_to_mlx_adapter, read_safetensors
from swallowctl.infer import (
    InferenceBackend,
    choose_model,
    collect,
    open_backend,
    read_adapter,
)

runner = CliRunner()
CFG = SwallowConfig()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tmp_path_factory.mktemp("run") / "final", seed=1)


@pytest.fixture(scope="module")
def exports(adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {f: export(adapter, f, root / f, cfg=CFG).output for f in ("merged", "mlx-adapter")}


def backend_for(backend: str, model: str | None, adapter: Path | None) -> InferenceBackend:
    info = read_adapter(adapter) if adapter else None
    resolved, load_id = choose_model(model, info, CFG, backend=backend)  # type: ignore[arg-type]
    return open_backend(backend, resolved, load_id, CFG, info)  # type: ignore[arg-type]


def test_peft_mlx_adapter_and_merged_agree(adapter: Path, exports: dict[str, Path]) -> None:
    runs = {
        "torch+peft": backend_for("torch", None, adapter),
        "mlx+mlx-adapter": backend_for("mlx", None, exports["mlx-adapter"]),
        "torch merged": backend_for("torch", str(exports["merged"]), None),
    }
    base = backend_for("torch", TINY, None)
    for text in PROMPTS:
        answers = {k: collect(b.stream_generate(chat(text), GREEDY)) for k, b in runs.items()}
        tokens = {k: a.token_ids for k, a in answers.items()}
        assert len({tuple(t) for t in tokens.values()}) == 1, tokens
        assert tokens["torch+peft"] != collect(base.stream_generate(chat(text), GREEDY)).token_ids
        forced = runs["torch+peft"].prompt_ids(chat(text)) + tokens["torch+peft"]
        reference = runs["torch+peft"].logits(forced)
        for name, b in runs.items():
            np.testing.assert_allclose(b.logits(forced), reference, atol=LOGIT_ATOL, err_msg=name)


def test_merged_loads_without_peft_and_records_provenance(
    adapter: Path, exports: dict[str, Path]
) -> None:
    from transformers import AutoModelForCausalLM, GenerationConfig

    merged = exports["merged"]
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in k for k in model.state_dict())
    assert type(model).__name__ == "LlamaForCausalLM"
    stops = list(resolve(TINY).stop_token_ids)
    assert GenerationConfig.from_pretrained(merged).eos_token_id == stops
    assert (merged / "tokenizer.json").is_file() and (merged / "model.safetensors").is_file()
    info = json.loads((merged / "swallowctl_export.json").read_text(encoding="utf-8"))
    assert info["format"] == "merged" and info["settings"] == {"dtype": "float32"}
    assert info["base_model"]["name"] == TINY
    assert info["adapter"]["run_dir"] == str(adapter.parent.resolve())
    assert info["config"]["generation"]["temperature"] == 0.7  # the manifest's config
    mlx_config = json.loads((exports["mlx-adapter"] / "adapter_config.json").read_text())
    assert mlx_config["fine_tune_type"] == "lora" and mlx_config["num_layers"] == 2
    assert mlx_config["lora_parameters"]["scale"] == 2.0  # alpha 16 / r 8
    assert "self_attn.q_proj" in mlx_config["lora_parameters"]["keys"]


def test_quantized_mlx_export_runs_in_mlx_lm(adapter: Path, tmp_path: Path) -> None:
    from mlx_lm import generate, load

    out = tmp_path / "mlx-4bit"
    r = runner.invoke(app, ["export", str(adapter), "--format", "mlx", "--output", str(out)])
    assert r.exit_code == 0, r.stderr
    assert str(out) in r.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    assert sorted(config["eos_token_id"]) == sorted(resolve(TINY).stop_token_ids)
    model, tokenizer = load(str(out))
    text = generate(model, tokenizer, prompt="こんにちは", max_tokens=8)
    assert isinstance(text, str) and text
    r = runner.invoke(
        app,
        [
            "infer",
            "--backend",
            "mlx",
            "--model",
            str(out),
            "--prompt",
            "こんにちは",
            "--max-new-tokens",
            "4",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["backend"] == "mlx"


def test_existing_output_refused_before_any_load(
    adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import swallowctl.ppo.policy as policy

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the output check")

    monkeypatch.setattr(policy, "load_base", no_loading)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    r = runner.invoke(app, ["export", str(adapter), "--output", str(out)])
    assert r.exit_code == 2
    assert "not empty" in r.stderr and "--force" in r.stderr
    monkeypatch.undo()
    args = ["export", str(adapter), "--format", "mlx-adapter", "--output", str(out), "--force"]
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.stderr
    assert not (out / "old.txt").exists() and (out / "adapters.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no set-aside copy is left
    assert json.loads(r.stdout)["format"] == "mlx-adapter"


def test_checkpoint_without_manifest_exports(tmp_path: Path) -> None:
    ckpt = make_adapter(tmp_path / "run" / "checkpoint-4", seed=2, manifest=False)
    result = export(ckpt, "mlx-adapter", None, cfg=CFG)
    assert result.output == tmp_path / "run" / "export-mlx-adapter"  # default: beside the run
    info = json.loads((result.output / "swallowctl_export.json").read_text())
    assert info["base_model"]["model_id"] == resolve(TINY).model_id
    assert info["adapter"]["updates"] is None and info["config"] is None


def test_bf16_adapters_read_exactly_and_unsupported_peft_refused(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    tensor = torch.randn(4, 8).to(torch.bfloat16)
    save_file({"w": tensor}, str(tmp_path / "t.safetensors"))
    read = read_safetensors(tmp_path / "t.safetensors")["w"]
    np.testing.assert_array_equal(read, tensor.float().numpy())

    ckpt = make_adapter(tmp_path / "dora", manifest=False)
    config = json.loads((ckpt / "adapter_config.json").read_text())
    (ckpt / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(UsageError, match="use_dora"):
        peft_to_mlx_adapter(ckpt, tmp_path / "x", num_layers=2)
