"""Tests for swallowctl.core.env: the machine probe is plain, JSON-ready data, never raises,
never holds the Hugging Face token, and stays light without torch."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest

from swallowctl.core import env

FAKE_TOKEN = "hf_swallowctlFakeToken0123456789abcdef"


def test_probe_reports_this_machine() -> None:
    torch = pytest.importorskip("torch")
    info = env.probe(mlx_op=False)

    system = info.system
    assert system.os == platform.system() and system.machine == platform.machine()
    assert system.python == "{}.{}.{}".format(*sys.version_info[:3])
    assert system.executable == sys.executable
    assert system.apple_silicon == (system.os == "Darwin" and system.machine == "arm64")
    assert system.cpu_count and system.cpu_count >= 1
    if system.os == "Linux":
        assert system.memory_bytes and system.memory_bytes > 2**30
        assert not system.apple_silicon

    assert info.packages["torch"] == importlib.metadata.version("torch")
    assert set(info.packages) == set(env.PACKAGES)

    assert info.torch.probed and info.torch.error is None
    assert info.torch.version == torch.__version__
    assert info.torch.cuda_build == torch.version.cuda
    assert info.torch.cuda_available == torch.cuda.is_available()
    assert len(info.torch.gpus) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    for gpu in info.torch.gpus:  # only on a CUDA machine
        assert gpu.error is None and gpu.total_bytes and gpu.free_bytes is not None
        assert gpu.free_bytes <= gpu.total_bytes and gpu.capability is not None

    from huggingface_hub import constants

    assert info.hub.cache_dir == constants.HF_HUB_CACHE
    assert info.hub.cache_free_bytes is not None and info.hub.cache_free_bytes > 0
    assert info.mlx.installed == (importlib.util.find_spec("mlx") is not None)
    assert info.mlx.usable is None  # not asked to run an MLX op


@pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64"), reason="this dev box only"
)
def test_probe_on_the_linux_cpu_box() -> None:
    pytest.importorskip("torch")
    info = env.probe()
    assert (info.system.os, info.system.machine) == ("Linux", "x86_64")
    if info.torch.cuda_build is None:  # the CPU wheel this project develops on
        assert not info.torch.cuda_available and info.torch.gpus == ()
        assert not info.torch.mps_available


def test_asdict_is_json_serialisable() -> None:
    info = env.probe(with_torch=True, mlx_op=importlib.util.find_spec("mlx") is not None)
    data = json.loads(json.dumps(dataclasses.asdict(info)))
    assert set(data) == {"system", "packages", "torch", "hub", "mlx"}
    assert data["system"]["os"] == info.system.os
    assert data["hub"]["token_present"] in (True, False)


def test_token_never_appears_in_the_probe(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    caplog.set_level("DEBUG")
    info = env.probe(with_torch=False)
    assert info.hub.token_present is True
    assert FAKE_TOKEN not in repr(info)
    assert FAKE_TOKEN not in json.dumps(dataclasses.asdict(info))
    assert FAKE_TOKEN not in caplog.text

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_TOKEN_PATH", "/nonexistent")  # for a subprocess; constants below
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent/token")
    assert env.probe(with_torch=False).hub.token_present is False


def test_probe_without_torch_is_fast_and_imports_no_torch() -> None:
    code = (
        "import json, sys, time\n"
        "from swallowctl.core.env import probe\n"
        "t = time.perf_counter()\n"
        "info = probe(with_torch=False)\n"
        "elapsed = time.perf_counter() - t\n"
        "heavy = [m for m in ('torch', 'transformers', 'mlx', 'mlx.core') if m in sys.modules]\n"
        "print(json.dumps({'elapsed': elapsed, 'heavy': heavy, 'probed': info.torch.probed,"
        " 'torch_version': info.packages['torch']}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert result["probed"] is False
    assert result["elapsed"] < 0.3, result
    # Versions still come from package metadata.
    expected = importlib.metadata.version("torch") if _installed("torch") else None
    assert result["torch_version"] == expected


def test_gpu_details_from_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA path, driven by a stand-in torch: per-GPU numbers, bf16 rule, per-GPU errors."""

    class FakeCuda:
        devices: ClassVar = {0: ("NVIDIA H100 80GB HBM3", 9, 0), 2: ("Tesla T4", 7, 5)}

        def is_available(self) -> bool:
            return True

        def device_count(self) -> int:
            return 3

        def get_device_properties(self, i: int) -> SimpleNamespace:
            if i not in self.devices:
                raise RuntimeError("CUDA error: uncorrectable ECC error encountered\nmore")
            name, major, minor = self.devices[i]
            return SimpleNamespace(name=name, major=major, minor=minor)

        def mem_get_info(self, i: int) -> tuple[int, int]:
            return (70 * 2**30, 80 * 2**30) if i == 0 else (14 * 2**30, 15 * 2**30)

    fake_torch = SimpleNamespace(
        __version__="2.13.0+cu128",
        version=SimpleNamespace(cuda="12.8"),
        cuda=FakeCuda(),
        backends=SimpleNamespace(mps=SimpleNamespace(is_available=lambda: False)),
    )
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    info = env.probe(with_torch=True)

    assert info.torch.error is None and info.torch.cuda_available
    assert (info.torch.version, info.torch.cuda_build) == ("2.13.0+cu128", "12.8")
    h100, broken, t4 = info.torch.gpus
    assert h100 == env.GPUInfo(
        index=0,
        name="NVIDIA H100 80GB HBM3",
        total_bytes=80 * 2**30,
        free_bytes=70 * 2**30,
        capability=(9, 0),
        bf16=True,
    )
    assert t4.capability == (7, 5) and t4.bf16 is False
    assert broken.index == 1 and broken.name is None
    assert broken.error == "RuntimeError: CUDA error: uncorrectable ECC error encountered"
    json.dumps(dataclasses.asdict(info))  # tuples of GPUs still serialise


def test_half_installed_environment_never_raises(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub
    from huggingface_hub import constants

    real_version = importlib.metadata.version

    def version(name: str) -> str:
        if name == "trl":
            raise importlib.metadata.PackageNotFoundError(name)
        if name == "peft":
            raise ValueError("broken METADATA")
        return real_version(name)

    def no_token() -> None:
        raise RuntimeError("OIDC exchange failed for " + FAKE_TOKEN)

    def no_disk(path: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    monkeypatch.setattr(huggingface_hub, "get_token", no_token)
    monkeypatch.setattr(env.shutil, "disk_usage", no_disk)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "not" / "yet" / "there"))

    info = env.probe(with_torch=True)
    assert info.packages["trl"] is None and info.packages["peft"] is None
    assert info.torch.probed and info.torch.version is None
    assert info.torch.error is not None and info.torch.error.startswith("ModuleNotFoundError")
    assert info.hub.cache_free_bytes is None and info.hub.token_present is False
    assert info.hub.error is not None and "Permission denied" in info.hub.error
    assert FAKE_TOKEN not in repr(info)


def test_cache_free_space_uses_nearest_existing_parent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "a" / "b" / "hub"))
    hub = env.probe(with_torch=False).hub
    assert hub.cache_dir == str(tmp_path / "a" / "b" / "hub")
    assert hub.cache_free_bytes is not None and hub.error is None
    assert not (tmp_path / "a").exists()  # probing creates nothing


def test_offline_and_endpoint_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example")
    hub = env.probe(with_torch=False).hub
    assert hub.offline is True and hub.endpoint == "https://hf-mirror.example"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_ENDPOINT")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub = env.probe(with_torch=False).hub
    assert hub.offline is False and hub.endpoint is None


def test_mlx_runs_a_real_op_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlx.core")
    mlx = env.probe(with_torch=False, mlx_op=True).mlx
    assert mlx.installed and mlx.usable is True and mlx.error is None
    assert mlx.device is not None and ("cpu" in mlx.device or "gpu" in mlx.device)

    monkeypatch.setattr(env.importlib.util, "find_spec", lambda name: None)
    missing = env.probe(with_torch=False, mlx_op=True).mlx
    assert (missing.installed, missing.mlx_lm_installed, missing.usable) == (False, False, None)


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
