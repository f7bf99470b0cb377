"""doctor tells the truth about this machine, and about machines we describe to it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from swallowctl.cli import app
from swallowctl.core.config import SwallowConfig, load_config
from swallowctl.core.env import GPUInfo, MachineInfo, MLXInfo, TorchInfo, probe
from swallowctl.doctor import Check, DoctorReport, run_doctor

TINY = ("model.name_or_path=builtin:tiny-ja",)


def by_id(report: DoctorReport) -> dict[str, Check]:
    return {c.id: c for c in report.checks}


@pytest.fixture(scope="module")
def here() -> MachineInfo:
    return probe(with_torch=True)


def test_this_machine_cannot_train_swallow(here: MachineInfo) -> None:
    report = run_doctor(SwallowConfig(), machine=here)
    checks = by_id(report)
    assert checks["gpu"].status == "fail"
    assert "NVIDIA GPU" in checks["gpu"].fix
    assert checks["torch"].status == "warn" and "CPU build" in checks["torch"].value
    # The 4-bit kernel really ran on this CPU, not just imported.
    assert checks["bitsandbytes"].status == "ok"
    assert "NF4 matmul runs on cpu" in checks["bitsandbytes"].value
    assert report.failed and not report.verdict.can_train
    assert "no CUDA GPU" in report.verdict.summary
    assert "not estimated yet" in report.verdict.memory


def test_this_machine_trains_the_tiny_model(here: MachineInfo) -> None:
    cfg = load_config(None, TINY).config
    report = run_doctor(cfg, machine=here)
    assert not report.failed, [c for c in report.checks if c.status == "fail"]
    assert report.verdict.can_train
    assert report.verdict.summary == "can train builtin:tiny-ja on the CPU"


def test_mlx_is_stated_as_inference_only(here: MachineInfo) -> None:
    report = run_doctor(SwallowConfig(), "mlx", machine=probe(with_torch=False, mlx_op=True))
    assert by_id(report)["mlx"].status == "ok"
    assert report.verdict.can_infer and not report.verdict.can_train
    assert "MLX runs inference only" in report.verdict.summary
    assert "PPO training needs PyTorch" in report.verdict.summary


def machine(**parts: object) -> MachineInfo:
    """This machine's probe with some parts replaced: a GPU box or a Mac we do not have."""
    base = probe(with_torch=False)
    return dataclasses.replace(base, **parts)


def gpu(index: int, name: str, cap: tuple[int, int], total_gib: int) -> GPUInfo:
    return GPUInfo(
        index=index,
        name=name,
        total_bytes=total_gib * 2**30,
        free_bytes=(total_gib - 1) * 2**30,
        capability=cap,
    )


def test_gpu_box_bf16_and_fp16_advice() -> None:
    torch_info = TorchInfo(
        probed=True,
        version="2.13.0+cu128",
        cuda_build="12.8",
        cuda_available=True,
        gpus=(gpu(0, "NVIDIA H100", (9, 0), 80), gpu(1, "Tesla T4", (7, 5), 16)),
    )
    m = machine(torch=torch_info)
    report = run_doctor(SwallowConfig(), machine=m, kernel_check=False)
    checks = by_id(report)
    assert checks["gpu0"].status == "ok" and "bf16" in checks["gpu0"].value
    assert checks["gpu1"].status == "warn"
    assert "float16" in checks["gpu1"].fix
    assert checks["torch"].value == "2.13.0+cu128, CUDA 12.8"
    assert report.verdict.can_train
    assert "in 4-bit" in report.verdict.summary
    assert "have: 80.0 GiB per GPU" in report.verdict.memory


def test_mac_without_torch_says_what_it_can_do() -> None:
    system = dataclasses.replace(
        probe(with_torch=False).system,
        os="Darwin",
        machine="arm64",
        apple_silicon=True,
        release="15.1",
        distro=None,
    )
    m = machine(
        system=system,
        torch=TorchInfo(probed=True, error="ModuleNotFoundError: torch"),
        packages={**probe(with_torch=False).packages, "torch": None},
        mlx=MLXInfo(
            installed=True, mlx_lm_installed=True, usable=True, metal=True, device="Device(gpu, 0)"
        ),
    )
    train = run_doctor(SwallowConfig(), machine=m, kernel_check=False)
    assert not train.verdict.can_train
    platform_fix = by_id(train)["platform"].fix
    assert "infer --backend mlx" in platform_fix and "export --format mlx" in platform_fix
    mlx = run_doctor(SwallowConfig(), "mlx", machine=m)
    assert mlx.verdict.can_infer and not mlx.failed
    assert by_id(mlx)["torch"].status == "info"


def test_old_library_versions_warn_with_the_fix() -> None:
    m = machine(packages={**probe(with_torch=False).packages, "transformers": "4.44.0"})
    check = by_id(run_doctor(SwallowConfig(), machine=m, kernel_check=False))["transformers"]
    assert check.status == "warn"
    assert "transformers<6,>=5" in check.fix


def test_gated_model_without_token_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    cfg = load_config(None, ("model.name_or_path=llama-3.1-8b",)).config
    check = by_id(run_doctor(cfg, machine=probe(with_torch=False), kernel_check=False))["hf_token"]
    assert check.status == "warn" and "hf auth login" in check.fix


def test_cli_json_is_valid_and_never_shows_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "hf_doctorSecret0123456789abcdefXYZ"
    monkeypatch.setenv("HF_TOKEN", secret)
    r = CliRunner().invoke(app, ["doctor", "--json"])
    assert r.exit_code == 1  # no CUDA GPU for Swallow-8B here
    report = DoctorReport.model_validate_json(r.stdout)  # the schema: extra keys are errors
    assert by_id(report)["hf_token"].value == "set (not shown)"
    assert secret not in r.stdout + r.stderr
    r = CliRunner().invoke(app, ["doctor", "--set", TINY[0]])
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "verdict: can train builtin:tiny-ja on the CPU" in r.stdout


def test_doctor_answers_with_torch_and_bitsandbytes_unimportable(tmp_path: Path) -> None:
    # A sitecustomize that makes `import torch` / `import bitsandbytes` fail, as in a broken env.
    (tmp_path / "sitecustomize.py").write_text(
        textwrap.dedent("""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "bitsandbytes"):
                    raise ImportError(f"{name} is broken in this test")
        sys.meta_path.insert(0, _Block())
    """)
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run(
        [sys.executable, "-m", "swallowctl", "doctor", "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    report = DoctorReport.model_validate_json(r.stdout)
    checks = by_id(report)
    assert checks["torch"].status == "fail"
    assert "does not import" in checks["torch"].value
    assert checks["bitsandbytes"].status != "ok"
    assert json.loads(r.stdout)["verdict"]["can_train"] is False
