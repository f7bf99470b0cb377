"""A probe of this machine as plain data: OS, Python, packages, torch/CUDA/MPS and GPUs, the
Hugging Face cache and login, MLX.

Everything is a frozen dataclass, so `dataclasses.asdict(probe())` is ready for `--json`. The
probe never raises on a half-installed environment: a part that fails to probe carries the
reason in its `error` field. The Hugging Face token is only ever reported as present or not.

`probe(with_torch=False)` imports no torch and stays fast (doctor's first screen, `--help`-like
paths); torch details need `with_torch=True`, which costs torch's import (seconds) and, with
CUDA, one context per GPU for `mem_get_info`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Distribution names as pip knows them; versions are read from metadata, nothing is imported.
PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "accelerate",
    "trl",
    "mlx",
    "mlx-lm",
    "huggingface-hub",
    "tokenizers",
    "safetensors",
)

_BF16_MIN_CAPABILITY = (8, 0)  # Ampere and later have bf16 tensor cores


@dataclass(frozen=True)
class SystemInfo:
    """Operating system, CPU architecture and Python."""

    os: str  # platform.system(): "Linux", "Darwin", "Windows"
    release: str  # kernel release (Linux), macOS version (Darwin)
    distro: str | None  # e.g. "Ubuntu 22.04.4 LTS"; None where unknown
    machine: str  # "x86_64", "arm64", "aarch64"
    apple_silicon: bool
    cpu_count: int | None
    memory_bytes: int | None  # physical RAM
    python: str  # "3.11.7"
    python_implementation: str
    executable: str
    error: str | None = None


@dataclass(frozen=True)
class GPUInfo:
    """One CUDA device."""

    index: int
    name: str | None = None
    total_bytes: int | None = None
    free_bytes: int | None = None
    capability: tuple[int, int] | None = None
    bf16: bool | None = None  # compute capability >= 8.0
    error: str | None = None


@dataclass(frozen=True)
class TorchInfo:
    """What torch sees. `probed` is False when the probe was asked to skip torch."""

    probed: bool
    version: str | None = None
    cuda_build: str | None = None  # torch.version.cuda: None on CPU and ROCm/MPS builds
    cuda_available: bool = False
    mps_available: bool = False
    gpus: tuple[GPUInfo, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class HubInfo:
    """Hugging Face Hub settings: cache, free disk there, login, offline mode, endpoint."""

    cache_dir: str | None = None
    cache_free_bytes: int | None = None  # free space on the disk holding the cache
    token_present: bool = False  # never the token itself
    offline: bool = False
    endpoint: str | None = None  # HF_ENDPOINT when set
    error: str | None = None


@dataclass(frozen=True)
class MLXInfo:
    """Whether MLX is installed and, when checked, usable for a real operation."""

    installed: bool = False
    mlx_lm_installed: bool = False
    usable: bool | None = None  # None: not checked (probe(mlx_op=False))
    device: str | None = None  # mx.default_device(), e.g. "Device(gpu, 0)"
    metal: bool | None = None
    error: str | None = None


@dataclass(frozen=True)
class MachineInfo:
    """The whole probe."""

    system: SystemInfo
    packages: dict[str, str | None]  # distribution -> version, None when not installed
    torch: TorchInfo
    hub: HubInfo
    mlx: MLXInfo


def probe(*, with_torch: bool = True, mlx_op: bool = False) -> MachineInfo:
    """Probe this machine. Never raises: failures land in each part's `error` field.

    Args:
        with_torch: import torch and report CUDA/MPS and every GPU (slow); False keeps the probe
            light and leaves torch unimported.
        mlx_op: run one tiny MLX operation to prove MLX works, not only that it is installed.
    """
    return MachineInfo(
        system=_system(),
        packages=package_versions(),
        torch=_torch() if with_torch else TorchInfo(probed=False),
        hub=_hub(),
        mlx=_mlx(run_op=mlx_op),
    )


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (from its metadata; nothing is imported)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
        except Exception as e:  # a broken dist-info must not break the probe
            logger.debug("cannot read the version of %s: %s", name, e)
            versions[name] = None
    return versions


# ---- parts ------------------------------------------------------------------------------


def _error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}"[:300] if text else type(e).__name__


def _system() -> SystemInfo:
    base = {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "executable": sys.executable,
    }
    try:
        system, machine = platform.system(), platform.machine()
        release = platform.mac_ver()[0] if system == "Darwin" else platform.release()
        # Under Rosetta, an arm64 Mac reports x86_64; sysctl would tell, but that is a
        # subprocess: the MLX part reveals it anyway (mlx wheels are arm64-only on macOS).
        return SystemInfo(
            os=system,
            release=release,
            distro=_distro(system),
            machine=machine,
            apple_silicon=system == "Darwin" and machine == "arm64",
            cpu_count=os.cpu_count(),
            memory_bytes=_memory_bytes(),
            **base,
        )
    except Exception as e:
        return SystemInfo(
            os=sys.platform,
            release="",
            distro=None,
            machine="",
            apple_silicon=False,
            cpu_count=None,
            memory_bytes=None,
            error=_error(e),
            **base,
        )


def _distro(system: str) -> str | None:
    if system != "Linux":
        return None
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME")
    except OSError:
        return None


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # Windows has no sysconf
        return None


def _torch() -> TorchInfo:
    try:
        import torch
    except Exception as e:  # not installed, or a broken CUDA wheel failing at import
        return TorchInfo(probed=True, error=_error(e))
    version = str(torch.__version__)
    cuda_build = getattr(torch.version, "cuda", None)
    try:
        mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    except Exception:
        mps = False
    try:
        cuda = torch.cuda.is_available()
        count = torch.cuda.device_count() if cuda else 0
    except Exception as e:
        return TorchInfo(
            probed=True, version=version, cuda_build=cuda_build, mps_available=mps, error=_error(e)
        )
    return TorchInfo(
        probed=True,
        version=version,
        cuda_build=cuda_build,
        cuda_available=cuda,
        mps_available=mps,
        gpus=tuple(_gpu(torch, i) for i in range(count)),
    )


def _gpu(torch: Any, index: int) -> GPUInfo:
    cuda = torch.cuda
    try:
        props = cuda.get_device_properties(index)
        capability = (int(props.major), int(props.minor))
        # mem_get_info creates this device's CUDA context (a few hundred MB) on first call.
        free, total = cuda.mem_get_info(index)
        return GPUInfo(
            index=index,
            name=str(props.name),
            total_bytes=int(total),
            free_bytes=int(free),
            capability=capability,
            bf16=capability >= _BF16_MIN_CAPABILITY,
        )
    except Exception as e:
        return GPUInfo(index=index, error=_error(e))


def _hub() -> HubInfo:
    env_offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        from huggingface_hub import constants

        cache_dir = str(constants.HF_HUB_CACHE)
        offline = bool(constants.HF_HUB_OFFLINE) or env_offline
    except Exception as e:
        return HubInfo(offline=env_offline, endpoint=endpoint, error=_error(e))
    error = None
    try:
        free = shutil.disk_usage(_nearest_existing(Path(cache_dir))).free
    except OSError as e:
        free, error = None, _error(e)
    try:
        from huggingface_hub import get_token

        # Kept to a bool at once: the token itself never reaches a field, a log or an error.
        token_present = get_token() is not None
    except Exception as e:  # e.g. an OIDC exchange configured but failing
        token_present = False
        error = error or f"cannot read the Hugging Face token ({type(e).__name__})"
    return HubInfo(
        cache_dir=cache_dir,
        cache_free_bytes=free,
        token_present=token_present,
        offline=offline,
        endpoint=endpoint,
        error=error,
    )


def _nearest_existing(path: Path) -> Path:
    """The path itself or its closest existing parent (the cache may not exist yet)."""
    path = path.expanduser().absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or "/")


def _mlx(*, run_op: bool) -> MLXInfo:
    try:
        installed = importlib.util.find_spec("mlx") is not None
        mlx_lm = importlib.util.find_spec("mlx_lm") is not None
    except Exception as e:
        return MLXInfo(error=_error(e))
    if not installed or not run_op:
        return MLXInfo(installed=installed, mlx_lm_installed=mlx_lm)
    try:
        import mlx.core as mx

        result = mx.array([1.0, 2.0]) * 2
        mx.eval(result)
        if result.tolist() != [2.0, 4.0]:
            raise RuntimeError(f"1*2, 2*2 gave {result.tolist()}")
        metal = bool(mx.metal.is_available()) if hasattr(mx, "metal") else False
        device = str(mx.default_device())
    except Exception as e:
        return MLXInfo(installed=True, mlx_lm_installed=mlx_lm, usable=False, error=_error(e))
    return MLXInfo(installed=True, mlx_lm_installed=mlx_lm, usable=True, device=device, metal=metal)
