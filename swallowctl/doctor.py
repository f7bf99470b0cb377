"""`swallowctl doctor`: can this machine train or infer the configured model, and what to fix.

Every check turns what the probe saw into ok / warn / fail with the measured value and, when not
ok, the fix. A missing or broken package is a check result, never a traceback.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from swallowctl import __version__
from swallowctl.core.config import SwallowConfig
from swallowctl.core.env import MachineInfo, probe
from swallowctl.core.models import ModelInfo, lookup

log = logging.getLogger(__name__)

Status = Literal["ok", "warn", "fail", "info"]
Backend = Literal["torch", "mlx"]

# What swallowctl is built and tested against (pyproject's `train` extra says the same).
SUPPORTED = {
    "torch": ">=2.4",
    "transformers": ">=5,<6",
    "peft": ">=0.17",
    "bitsandbytes": ">=0.46",
    "accelerate": ">=1.0",
    "trl": ">=1.0",
}
TRAIN_NEEDS = ("transformers", "peft", "accelerate")
MLX_ONLY_INFERENCE = (
    "MLX runs inference only (infer --backend mlx, export --format mlx); "
    "PPO training needs PyTorch, with CUDA for real runs"
)
INSTALL_TRAIN = (
    "pip install torch==2.13.0 (or your CUDA build) then pip install 'swallowctl[train]'"
)
DISK_MARGIN = 1.1  # blobs plus temp files while a shard is written
BF16_CAPABILITY = (8, 0)


class Check(BaseModel):
    """One line of the doctor's table."""

    model_config = ConfigDict(extra="forbid")

    id: str
    title: str
    status: Status
    value: str
    fix: str | None = None


class Verdict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: Backend
    model: str
    can_train: bool
    can_infer: bool
    summary: str
    memory: str


class DoctorReport(BaseModel):
    """What `doctor --json` prints; its JSON schema is `DoctorReport.model_json_schema()`."""

    model_config = ConfigDict(extra="forbid")

    swallowctl: str
    checks: list[Check]
    verdict: Verdict
    failed: bool
    machine: dict[str, Any]  # the raw probe (swallowctl.core.env.MachineInfo); no token in it


@dataclass
class _Context:
    cfg: SwallowConfig
    backend: Backend
    machine: MachineInfo
    info: ModelInfo | None
    builtin: bool  # builtin:tiny-ja: trains on any CPU

    @property
    def cuda(self) -> bool:
        return self.machine.torch.cuda_available and bool(self.machine.torch.gpus)

    @property
    def wants_4bit(self) -> bool:
        q = self.cfg.quantization.load_in_4bit
        return q is True or (q == "auto" and self.cuda)


def run_doctor(
    cfg: SwallowConfig,
    backend: Backend = "torch",
    *,
    machine: MachineInfo | None = None,
    kernel_check: bool = True,
) -> DoctorReport:
    """Run every check for `cfg` on this machine. `kernel_check` runs a real 4-bit matmul."""
    machine = machine or probe(with_torch=True, mlx_op=backend == "mlx")
    name = cfg.model.name_or_path
    ctx = _Context(cfg, backend, machine, lookup(name), name.lower().startswith("builtin:"))
    steps: list[Callable[[_Context], list[Check]]] = [
        _platform,
        _python,
        _torch,
        _gpus,
        lambda c: _bitsandbytes(c, kernel_check),
        _libraries,
        _hub,
        _model_cache,
        _mlx,
    ]
    checks = [check for step in steps for check in step(ctx)]
    verdict = _verdict(ctx, checks)
    failed = any(c.status == "fail" for c in checks)
    return DoctorReport(
        swallowctl=__version__,
        checks=checks,
        verdict=verdict,
        failed=failed,
        machine=dataclasses.asdict(machine),
    )


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def _platform(ctx: _Context) -> list[Check]:
    s = ctx.machine.system
    value = f"{s.os} {s.release} {s.machine}" + (f" ({s.distro})" if s.distro else "")
    if s.os == "Darwin":
        if s.apple_silicon:
            return [
                Check(
                    id="platform",
                    title="OS",
                    status="warn",
                    value=value,
                    fix=(
                        "a Mac trains nothing here: use infer --backend mlx and export "
                        "--format mlx; train on a Linux machine with an NVIDIA GPU"
                    ),
                )
            ]
        return [
            Check(
                id="platform",
                title="OS",
                status="warn",
                value=value,
                fix="Intel Macs have neither CUDA nor MLX: train and infer on Linux",
            )
        ]
    if s.os == "Windows":
        return [
            Check(
                id="platform",
                title="OS",
                status="warn",
                value=value,
                fix="use WSL2 (Ubuntu) with the NVIDIA driver for CUDA and bitsandbytes",
            )
        ]
    return [Check(id="platform", title="OS", status="ok", value=value)]


def _python(ctx: _Context) -> list[Check]:
    v = ctx.machine.system.python
    ok = tuple(int(x) for x in v.split(".")[:2]) >= (3, 11)
    return [
        Check(
            id="python",
            title="Python",
            status="ok" if ok else "fail",
            value=v,
            fix=None if ok else "install Python 3.11 or newer",
        )
    ]


def _needs_torch(ctx: _Context) -> Status:
    """How bad a missing torch piece is: fatal for the torch backend, irrelevant for MLX."""
    return "info" if ctx.backend == "mlx" else "fail"


def _torch(ctx: _Context) -> list[Check]:
    t = ctx.machine.torch
    if t.error or t.version is None:
        installed = ctx.machine.packages.get("torch")
        value = (
            f"{installed} installed but does not import: {t.error}"
            if installed
            else ("not installed")
        )
        return [
            Check(
                id="torch",
                title="PyTorch",
                status=_needs_torch(ctx),
                value=value,
                fix=INSTALL_TRAIN,
            )
        ]
    if t.cuda_available:
        return [
            Check(
                id="torch", title="PyTorch", status="ok", value=f"{t.version}, CUDA {t.cuda_build}"
            )
        ]
    if t.cuda_build:
        return [
            Check(
                id="torch",
                title="PyTorch",
                status="warn" if ctx.builtin else "fail",
                value=f"{t.version}, CUDA {t.cuda_build} build but no GPU visible",
                fix="check nvidia-smi, the driver and CUDA_VISIBLE_DEVICES",
            )
        ]
    status: Status = "ok" if ctx.builtin or ctx.backend == "mlx" else "warn"
    return [
        Check(
            id="torch",
            title="PyTorch",
            status=status,
            value=f"{t.version}, CPU build",
            fix=None
            if status == "ok"
            else "CPU builds train only builtin:tiny-ja; install a CUDA build for real runs",
        )
    ]


def _gpus(ctx: _Context) -> list[Check]:
    gpus = ctx.machine.torch.gpus if ctx.machine.torch.cuda_available else ()
    if not gpus:
        if ctx.backend == "mlx":
            return []
        if ctx.builtin:
            return [
                Check(
                    id="gpu",
                    title="GPU",
                    status="ok",
                    value=f"none (CUDA); {ctx.cfg.model.name_or_path} trains on CPU",
                )
            ]
        return [
            Check(
                id="gpu",
                title="GPU",
                status="fail",
                value="no CUDA GPU",
                fix=f"training {ctx.cfg.model.name_or_path} needs an NVIDIA GPU with CUDA; "
                "on this machine use model.name_or_path: builtin:tiny-ja to try the tool",
            )
        ]
    out = []
    for g in gpus:
        if g.error:
            out.append(
                Check(
                    id=f"gpu{g.index}",
                    title=f"GPU {g.index}",
                    status="fail",
                    value=g.error,
                    fix="check nvidia-smi and the driver",
                )
            )
            continue
        cap = ".".join(map(str, g.capability)) if g.capability else "?"
        value = f"{g.name}, {_gib(g.free_bytes)} free of {_gib(g.total_bytes)}, sm{cap}"
        if g.capability and g.capability < BF16_CAPABILITY:
            out.append(
                Check(
                    id=f"gpu{g.index}",
                    title=f"GPU {g.index}",
                    status="warn",
                    value=value + ", no bf16",
                    fix="compute in fp16: quantization.compute_dtype: float16 (auto does this)",
                )
            )
        else:
            out.append(
                Check(
                    id=f"gpu{g.index}", title=f"GPU {g.index}", status="ok", value=value + ", bf16"
                )
            )
    return out


def _bitsandbytes(ctx: _Context, kernel_check: bool) -> list[Check]:
    version = ctx.machine.packages.get("bitsandbytes")
    title = "bitsandbytes 4-bit"
    if ctx.backend == "mlx":
        return []
    # Without CUDA and 4-bit off, bitsandbytes is optional (CPU runs use fp32/bf16).
    status: Status = "fail" if ctx.wants_4bit else "warn"
    if version is None:
        return [
            Check(
                id="bitsandbytes",
                title=title,
                status=status,
                value="not installed",
                fix="pip install 'swallowctl[train]'",
            )
        ]
    if not kernel_check or ctx.machine.torch.version is None:
        return [
            Check(
                id="bitsandbytes",
                title=title,
                status="info",
                value=f"{version} (kernel not checked)",
            )
        ]
    device = "cuda" if ctx.cuda else "cpu"
    try:
        err = _nf4_matmul_error(device)
    except Exception as e:  # a broken install must be a result, not a crash
        err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if err is None:
        return [
            Check(
                id="bitsandbytes",
                title=title,
                status="ok",
                value=f"{version}, NF4 matmul runs on {device}",
            )
        ]
    return [
        Check(
            id="bitsandbytes",
            title=title,
            status=status,
            value=f"{version}, NF4 matmul fails on {device}: {err}",
            fix="pip install -U bitsandbytes; on CUDA check that its CUDA version matches torch's",
        )
    ]


def _nf4_matmul_error(device: str) -> str | None:
    """Quantize a small Linear to NF4, run it, compare with the dequantized weights.

    An import check is not enough: bitsandbytes imports fine on machines where its kernels fail.
    """
    import bitsandbytes as bnb
    import torch

    torch.manual_seed(0)
    dense = torch.nn.Linear(128, 64, bias=False)
    dtype = torch.float32 if device == "cpu" else torch.float16
    q = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=dtype, quant_type="nf4")
    q.load_state_dict(dense.state_dict())
    q = q.to(device)
    x = torch.randn(4, 128, device=device, dtype=dtype)
    with torch.no_grad():
        y = q(x)
        state = q.weight.quant_state  # type: ignore[attr-defined]  # a Params4bit
        w = bnb.functional.dequantize_4bit(q.weight.data, state).to(dtype)
        ref = x @ w.t()
    if not torch.isfinite(y).all():
        return "non-finite output"
    err = (y - ref).abs().max().item()
    return None if err < 1e-2 * max(1.0, ref.abs().max().item()) else f"off by {err:.3g}"


def _libraries(ctx: _Context) -> list[Check]:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    out = []
    for name in ("transformers", "peft", "accelerate", "trl"):
        version = ctx.machine.packages.get(name)
        spec = SpecifierSet(SUPPORTED[name])
        needed = ctx.backend == "torch" and name in TRAIN_NEEDS
        if version is None:
            status: Status = "fail" if needed else "info" if ctx.backend == "mlx" else "warn"
            why = (
                "" if needed else " (only needed for algorithm grpo/rloo)" if name == "trl" else ""
            )
            out.append(
                Check(
                    id=name,
                    title=name,
                    status=status,
                    value="not installed" + why,
                    fix=None if status == "info" else "pip install 'swallowctl[train]'",
                )
            )
            continue
        try:
            ok = Version(version) in spec
        except InvalidVersion:
            ok = False
        out.append(
            Check(
                id=name,
                title=name,
                status="ok" if ok else "warn",
                value=version,
                fix=None
                if ok
                else f"swallowctl is tested with {name}{spec}: pip install '{name}{spec}'",
            )
        )
    return out


def _hub(ctx: _Context) -> list[Check]:
    h = ctx.machine.hub
    gated = bool(ctx.info and ctx.info.gated)
    token = Check(
        id="hf_token",
        title="HF token",
        status="ok",
        value="set (not shown)" if h.token_present else "not set",
    )
    if not h.token_present and gated:
        token = Check(
            id="hf_token",
            title="HF token",
            status="warn",
            value="not set",
            fix=f"{ctx.info.hub_id if ctx.info else 'this model'} is gated: accept its "
            "licence on the Hub, then `hf auth login` or set HF_TOKEN",
        )
    out = [token]
    if h.offline:
        out.append(
            Check(
                id="offline",
                title="Hub access",
                status="info",
                value="offline (HF_HUB_OFFLINE=1): only cached models load",
            )
        )
    elif h.endpoint:
        out.append(
            Check(
                id="offline", title="Hub access", status="info", value=f"HF_ENDPOINT={h.endpoint}"
            )
        )
    return out


def _model_cache(ctx: _Context) -> list[Check]:
    name = ctx.cfg.model.name_or_path
    if ctx.builtin:
        return [
            Check(
                id="model", title="Model", status="ok", value=f"{name}: built locally, no download"
            )
        ]
    if Path(name).expanduser().is_dir():
        return [Check(id="model", title="Model", status="ok", value=f"local folder {name}")]
    repo = ctx.info.hub_id if ctx.info else name
    size = ctx.info.download_bytes if ctx.info else None
    free = ctx.machine.hub.cache_free_bytes
    try:
        from swallowctl.hub import cache_status

        status = cache_status(repo, ctx.cfg.model.revision)
    except Exception as e:  # a damaged cache is reported, not raised
        log.debug("cache check failed", exc_info=True)
        return [
            Check(
                id="model",
                title="Model",
                status="warn",
                value=f"{repo}: cache unreadable ({type(e).__name__})",
                fix=f"swallowctl download {repo}",
            )
        ]
    if status.complete:
        return [
            Check(
                id="model",
                title="Model",
                status="ok",
                value=f"{repo}: in the cache ({_gib(status.size_bytes)})",
            )
        ]
    missing = f"{repo}: not downloaded" if not status.commit else f"{repo}: incomplete in the cache"
    checks = [
        Check(
            id="model",
            title="Model",
            status="warn",
            value=missing + (f" ({_gib(size)})" if size else ""),
            fix=f"swallowctl download {repo}"
            + ("" if not ctx.machine.hub.offline else " (needs HF_HUB_OFFLINE unset)"),
        )
    ]
    if size and free is not None:
        need = math.ceil(size * DISK_MARGIN) - status.size_bytes
        ok = free >= need
        checks.append(
            Check(
                id="disk",
                title="Disk (Hub cache)",
                status="ok" if ok else "fail",
                value=f"{_gib(free)} free at {ctx.machine.hub.cache_dir}",
                fix=None
                if ok
                else f"free {_gib(need - free)} more, or point HF_HUB_CACHE at a bigger disk",
            )
        )
    return checks


def _mlx(ctx: _Context) -> list[Check]:
    m = ctx.machine.mlx
    s = ctx.machine.system
    if not m.installed or not m.mlx_lm_installed:
        if ctx.backend != "mlx" and not s.apple_silicon:
            return [
                Check(
                    id="mlx",
                    title="MLX",
                    status="info",
                    value="not installed (optional: infer --backend mlx)",
                )
            ]
        extra = "swallowctl[mlx]"
        return [
            Check(
                id="mlx",
                title="MLX",
                status="fail" if ctx.backend == "mlx" else "warn",
                value="mlx-lm not installed" if m.installed else "not installed",
                fix=f"pip install '{extra}'" + ("" if s.apple_silicon else " (mlx[cpu] on Linux)"),
            )
        ]
    if m.usable is False:
        return [
            Check(
                id="mlx",
                title="MLX",
                status="fail" if ctx.backend == "mlx" else "warn",
                value=f"installed but does not run: {m.error}",
                fix="pip install -U 'swallowctl[mlx]'",
            )
        ]
    where = m.device or ("Metal" if m.metal else "CPU" if platform.system() == "Linux" else "?")
    version = ctx.machine.packages.get("mlx")
    return [
        Check(
            id="mlx", title="MLX", status="ok", value=f"{version} on {where}: {MLX_ONLY_INFERENCE}"
        )
    ]


def _verdict(ctx: _Context, checks: list[Check]) -> Verdict:
    name = ctx.cfg.model.name_or_path
    blocking = [c for c in checks if c.status == "fail"]
    memory = _memory_line(ctx)
    if ctx.backend == "mlx":
        ok = not any(c.id in ("mlx", "python") for c in blocking)
        summary = (
            f"can run {name} with MLX (inference only)"
            if ok
            else "cannot run MLX here: " + "; ".join(c.value for c in blocking)
        )
        return Verdict(
            backend="mlx",
            model=name,
            can_train=False,
            can_infer=ok,
            summary=summary + f". {MLX_ONLY_INFERENCE}",
            memory=memory,
        )
    train_blockers = [c for c in blocking if c.id not in ("mlx",)]
    can_train = not train_blockers
    if can_train:
        where = "the GPU" if ctx.cuda else "the CPU"
        summary = f"can train {name} on {where}" + (" in 4-bit" if ctx.wants_4bit else "")
    else:
        summary = f"cannot train {name} here: " + "; ".join(
            f"{c.title}: {c.value}" for c in train_blockers
        )
    can_infer = not any(c.id in ("torch", "transformers", "python") for c in blocking)
    return Verdict(
        backend="torch",
        model=name,
        can_train=can_train,
        can_infer=can_infer,
        summary=summary,
        memory=memory,
    )


def _memory_line(ctx: _Context) -> str:
    have = [g.total_bytes for g in ctx.machine.torch.gpus if g.total_bytes]
    budget = ctx.cfg.model.max_memory_per_device_gib
    parts = ["needed: not estimated yet (tune-memory is not built)"]
    if have:
        parts.append(f"have: {_gib(max(have))} per GPU")
    if budget:
        parts.append(f"budget: {budget:g} GiB (model.max_memory_per_device_gib)")
    return "; ".join(parts)
