"""`swallowctl export`: a trained adapter as a merged model, an MLX model, or an mlx-lm adapter.

- merged: the base in bf16 (fp32 for the builtin tiny model) with the LoRA merged in; plain
  safetensors that `AutoModelForCausalLM` loads without peft, every stop id in generation_config.
- mlx: the merged model converted by `mlx_lm.convert` (4-bit, group 64 by default).
- mlx-adapter: the peft LoRA rewritten in mlx-lm's adapter format, used on top of the MLX base.

Every export is built in a temporary folder beside `--output` and renamed into place at the end,
so an interrupted export never leaves a half-written model where a loader would find it. Each one
records its provenance in `swallowctl_export.json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from swallowctl import __version__
from swallowctl.core.errors import RuntimeFailure, UsageError, io_reason
from swallowctl.core.paths import check_creatable
from swallowctl.infer import (
    EXPORT_MANIFEST,
    MLX_WEIGHTS,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    AdapterInfo,
    read_adapter,
)
from swallowctl.infer.fit import check_fits
from swallowctl.ppo.checkpoint import install

if TYPE_CHECKING:
    import numpy as np

    from swallowctl.core.config import SwallowConfig
    from swallowctl.core.models import ResolvedModel

log = logging.getLogger(__name__)

ExportFormat = Literal["merged", "mlx", "mlx-adapter"]
Dtype = Literal["bfloat16", "float16", "float32"]
FORMATS: tuple[ExportFormat, ...] = ("merged", "mlx", "mlx-adapter")
DEFAULT_Q_BITS = 4  # what mlx-community's Swallow twin uses
DEFAULT_Q_GROUP_SIZE = 64  # mlx-lm's default; every Linear of Llama-3.1 (and tiny-ja) divides


@dataclass
class ExportResult:
    """What was written where, and from what."""

    output: Path
    format: ExportFormat
    base_model: str
    adapter: Path
    files: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def check_output(output: Path, force: bool) -> None:
    """Refuse an existing non-empty folder (or a file) unless `force`. Cheap: runs first."""
    check_creatable(output, "--output")
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file", hint="give a folder path")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise UsageError(
            f"--output {output} exists and is not empty",
            hint="choose a new folder, or add --force to replace it",
        )


def export(
    adapter_path: Path,
    fmt: ExportFormat,
    output: Path | None,
    *,
    cfg: SwallowConfig,
    model: str | None = None,
    dtype: Dtype | None = None,
    quantize: bool = True,
    q_bits: int = DEFAULT_Q_BITS,
    q_group_size: int = DEFAULT_Q_GROUP_SIZE,
    force: bool = False,
) -> ExportResult:
    """Export a trained adapter (RUN/final or a checkpoint) in one of `FORMATS`.

    `output` defaults to `RUN_DIR/export-FORMAT`.

    Raises:
        UsageError: bad output folder, adapter or settings (checked before any model loads).
        MissingDependencyError: `mlx` without mlx-lm installed.
    """
    from swallowctl.infer import choose_model

    adapter = read_adapter(adapter_path)  # a few small JSON files: as cheap as the checks
    output = output or adapter.run_dir / f"export-{fmt}"
    check_output(output, force)
    if q_bits not in (2, 3, 4, 5, 6, 8):
        raise UsageError(f"--q-bits {q_bits}: mlx-lm quantizes to 2, 3, 4, 5, 6 or 8 bits")
    if adapter.format != "peft":
        raise UsageError(f"{adapter.path} is already an mlx-lm adapter; export needs the peft one")
    resolved, _ = choose_model(model, adapter, cfg, backend="torch")
    check_fits(adapter.path / PEFT_WEIGHTS, resolved.name, resolved.architecture)
    if fmt == "mlx":
        from swallowctl.infer.mlx_backend import require_mlx

        require_mlx()  # before minutes of merging
    settings: dict[str, Any] = {}
    if fmt != "mlx-adapter":
        settings["dtype"] = dtype or _default_dtype(resolved)
    if fmt == "mlx":
        settings.update(quantize=quantize, q_bits=q_bits, q_group_size=q_group_size)

    def build(tmp: Path) -> None:
        if fmt == "mlx-adapter":
            settings.update(peft_to_mlx_adapter(adapter.path, tmp, num_layers=_layers(resolved)))
        elif fmt == "merged":
            merge(adapter, resolved, cfg, tmp, settings["dtype"])
        else:
            _merge_then_convert(adapter, resolved, cfg, tmp, settings)
        provenance = _provenance(adapter, resolved, fmt, settings)
        (tmp / EXPORT_MANIFEST).write_text(
            json.dumps(provenance, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )

    _build_into(output, build)
    files = sorted(str(p.relative_to(output)) for p in output.rglob("*") if p.is_file())
    return ExportResult(output, fmt, resolved.name, adapter.path, files, settings)


def _default_dtype(resolved: ResolvedModel) -> Dtype:
    # The tiny model is fp32 on disk and its tests compare against fp32 runs; real models ship
    # bf16, and fp32 would double an 8B model's 16 GB for nothing.
    return "float32" if resolved.source == "builtin" else "bfloat16"


def _layers(resolved: ResolvedModel) -> int:
    return int(resolved.architecture.num_hidden_layers)


def _build_into(output: Path, build: Callable[[Path], None]) -> None:
    """Run `build(tmp)` in a temporary sibling of `output`, then move the result into place."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        build(tmp)
        # check_output allowed an existing output (empty, or --force): the old one is set aside
        # and removed only once the new one is in place, so a kill in between loses neither.
        install(tmp, output)
    except Exception as e:
        reason = io_reason(e)
        if reason is None:
            raise
        raise RuntimeFailure(
            f"could not write {output}: {reason}",
            hint="nothing was written there; free disk space (or fix the cause) and run again",
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _provenance(
    adapter: AdapterInfo, resolved: ResolvedModel, fmt: ExportFormat, settings: dict[str, Any]
) -> dict[str, Any]:
    manifest = adapter.manifest or {}
    twin = resolved.info.mlx_id if resolved.info and not resolved.is_local else None
    return {
        "swallowctl": __version__,
        "format": fmt,
        "base_model": {
            "name": adapter.base_name or resolved.name,
            "model_id": resolved.model_id,
            "revision": resolved.revision,
            "commit": resolved.commit or adapter.base_revision,
            # what `infer --backend mlx` loads under an mlx-adapter export
            "mlx_id": twin or resolved.model_id,
        },
        "adapter": {
            "path": str(adapter.path.resolve()),
            "run_dir": str(adapter.run_dir.resolve()),
            "sha256": _sha256(adapter.path / PEFT_WEIGHTS),
            "updates": manifest.get("updates"),
        },
        "config": manifest.get("config"),
        "settings": settings,
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- merged ---------------------------------------------------------------------------------


def merge(
    adapter: AdapterInfo, resolved: ResolvedModel, cfg: SwallowConfig, out: Path, dtype: Dtype
) -> None:
    """Base (unquantized, on CPU) + adapter, merged and saved as a plain transformers model.

    Merging into a 4-bit base would round the update away, so the base is loaded in `dtype`.
    """
    from swallowctl.infer.torch_backend import apply_adapter
    from swallowctl.ppo.policy import Precision, load_base, load_tokenizer

    precision = Precision(device="cpu", load_in_4bit=False, dtype=dtype, compute_dtype=dtype)
    log.info("loading %s in %s to merge %s", resolved.model_id, dtype, adapter.path)
    base = load_base(resolved, cfg, precision)
    merged = apply_adapter(base, adapter).merge_and_unload()
    stops = list(resolved.stop_token_ids)
    # Every stop id in both files: transformers reads generation_config, mlx-lm config.json.
    merged.config.eos_token_id = stops
    merged.config.use_cache = True
    merged.generation_config.eos_token_id = stops
    merged.generation_config.pad_token_id = resolved.pad_token_id
    merged.save_pretrained(out)
    load_tokenizer(resolved, cfg).save_pretrained(out)


def _merge_then_convert(
    adapter: AdapterInfo,
    resolved: ResolvedModel,
    cfg: SwallowConfig,
    out: Path,
    settings: dict[str, Any],
) -> None:
    from swallowctl.infer.mlx_backend import convert_to_mlx

    with tempfile.TemporaryDirectory(prefix=".merged-", dir=out.parent) as work:
        merged = Path(work) / "merged"
        merge(adapter, resolved, cfg, merged, settings["dtype"])
        converted = Path(work) / "mlx"  # mlx_lm.convert insists on a path that does not exist
        convert_to_mlx(
            merged,
            converted,
            quantize=settings["quantize"],
            q_bits=settings["q_bits"],
            q_group_size=settings["q_group_size"],
        )
        for item in converted.iterdir():
            shutil.move(str(item), out / item.name)


# --- peft -> mlx-lm adapter -------------------------------------------------------------------

# peft's LoRA tensors: `base_model.model.<module path>.lora_A.weight` (adapter name stripped).
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_LAYER_PREFIX = re.compile(r"^(?:model\.)?layers\.\d+\.")
# peft options mlx-lm's LoRALinear cannot express: (key, the value meaning "not used").
_UNSUPPORTED: tuple[tuple[str, Any], ...] = (
    ("use_dora", False),
    ("rank_pattern", {}),
    ("alpha_pattern", {}),
    ("bias", "none"),
    ("lora_bias", False),
    ("fan_in_fan_out", False),
    ("modules_to_save", None),
    ("layer_replication", None),
    ("trainable_token_indices", None),
    ("target_parameters", None),
)


def peft_to_mlx_adapter(adapter_dir: Path, out: Path, *, num_layers: int) -> dict[str, Any]:
    """Rewrite a peft LoRA adapter in mlx-lm's format (`adapters.safetensors` + config).

    peft computes `y = W x + (alpha / r) * B A x` with A [r, in] and B [out, r]; mlx-lm's
    LoRALinear computes `y = W x + scale * (x @ lora_a) @ lora_b` with lora_a [in, r] and
    lora_b [r, out]. So lora_a = A^T, lora_b = B^T, scale = alpha / r (alpha / sqrt(r) with
    rsLoRA); keys lose peft's `base_model.model.` prefix. Layers the adapter does not touch keep
    mlx-lm's zero-initialised lora_b: no change, as in peft.

    Returns the mlx-lm `lora_parameters` written.
    """
    from safetensors.numpy import save_file

    config = json.loads((adapter_dir / PEFT_CONFIG).read_text(encoding="utf-8"))
    _check_peft_config(config, adapter_dir)
    rank = int(config["r"])
    root = rank**0.5 if config.get("use_rslora") else rank
    scale = float(config["lora_alpha"]) / root
    weights: dict[str, np.ndarray] = {}
    keys: set[str] = set()
    for name, tensor in read_safetensors(adapter_dir / PEFT_WEIGHTS).items():
        m = _PEFT_KEY.match(name)
        if m is None:
            raise UsageError(
                f"{adapter_dir / PEFT_WEIGHTS}: '{name}' is not a LoRA A/B weight",
                hint="only plain LoRA on Linear layers converts to mlx-lm; export --format mlx",
            )
        weights[f"{m['module']}.lora_{m['ab'].lower()}"] = tensor.T.astype("float32", order="C")
        keys.add(_LAYER_PREFIX.sub("", m["module"]))
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / MLX_WEIGHTS))
    lora_parameters = {"rank": rank, "scale": scale, "dropout": 0.0, "keys": sorted(keys)}
    mlx_config = {
        "fine_tune_type": "lora",
        "num_layers": num_layers,  # every layer: untouched ones get a zero update
        "lora_parameters": lora_parameters,
    }
    (out / PEFT_CONFIG).write_text(json.dumps(mlx_config, indent=2) + "\n", encoding="utf-8")
    return {"mlx_lora_parameters": lora_parameters}


def _check_peft_config(config: dict[str, Any], where: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise UsageError(f"{where}: a {config.get('peft_type')} adapter; only LoRA converts")
    for key, unused in _UNSUPPORTED:
        value = config.get(key, unused)
        if value in (unused, None, False, {}, []):
            continue
        raise UsageError(
            f"{where}: peft option {key}={value!r} has no mlx-lm equivalent",
            hint="export --format mlx (merge, then convert) works for any LoRA",
        )


_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Read float tensors with numpy alone (bf16 widened to fp32 exactly).

    `safetensors.numpy` rejects bf16, and neither torch (absent on an MLX-only Mac) nor mlx (only
    the backend module imports it) may be needed just to rewrite an adapter.
    """
    import numpy as np

    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    body = memoryview(raw)[8 + size :]
    out: dict[str, np.ndarray] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        chunk = body[start:end]
        if meta["dtype"] == "BF16":  # bf16 is the top half of an fp32: shift it back up
            array = (np.frombuffer(chunk, "<u2").astype("<u4") << 16).view("<f4")
        elif meta["dtype"] in _DTYPES:
            array = np.frombuffer(chunk, _DTYPES[meta["dtype"]])
        else:
            raise UsageError(f"{path}: tensor '{name}' has dtype {meta['dtype']}, not a float")
        out[name] = array.reshape(meta["shape"])
    return out


def result_dict(result: ExportResult) -> dict[str, Any]:
    """The result as plain JSON-able data (for --json)."""
    data = dataclasses.asdict(result)
    data["output"], data["adapter"] = str(result.output), str(result.adapter)
    return data
