"""Does an adapter fit its base? Answered from file headers, before any model loads.

peft and mlx-lm find a mismatch only while loading (a size-mismatch error deep in a state dict,
or, converting to mlx-lm, not at all); a torn or foreign weights file fails inside their readers.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swallowctl.core.errors import UsageError

if TYPE_CHECKING:
    from swallowctl.core.models import Architecture

_MAX_HEADER = 100_000_000  # safetensors' own limit
# peft's key of a LoRA matrix in a Llama block: ...layers.<i>.<self_attn|mlp>.<proj>.lora_A.weight
_LORA_KEY = re.compile(
    r"layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<module>\w+)\.lora_(?P<ab>[AB])\.weight$"
)


def safetensors_header(path: Path) -> dict[str, Any]:
    """Names, dtypes and shapes of the tensors in a .safetensors file, without reading them.

    Raises:
        UsageError: the file is not a readable safetensors file (torn, junk, another format).
    """
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > _MAX_HEADER:
                raise ValueError(f"a header of {size} bytes")
            header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, struct.error, ValueError) as e:
        raise UsageError(
            f"{path}: not a readable safetensors file ({e})",
            hint="the file is truncated or of another format; use the adapter training wrote",
        ) from None
    header.pop("__metadata__", None)
    return header


def _linear_shapes(a: Architecture) -> dict[str, tuple[int, int]]:
    """(in, out) features of each Linear of a Llama block."""
    q, kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    h, i = a.hidden_size, a.intermediate_size
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def check_fits(weights: Path, base: str, arch: Architecture) -> None:
    """Raise UsageError naming the first LoRA matrix of `weights` that does not fit `base`.

    peft's A is [r, in] and B [out, r]; layers past the base's count, or Linear layers it lacks,
    mean the adapter was trained on another model. Only Llama bases are known here.
    """
    header = safetensors_header(weights)
    if arch.model_type != "llama":
        return
    shapes = _linear_shapes(arch)
    for name, meta in header.items():
        m = _LORA_KEY.search(name)
        if m is None:
            continue
        layer, module = int(m["layer"]), m["module"]
        shape = list(meta.get("shape") or [])
        if layer >= arch.num_hidden_layers:
            problem = f"layer {layer}, but {base} has {arch.num_hidden_layers} layers"
        elif module not in shapes:
            problem = f"{base} has no Linear '{module}'"
        else:
            fan_in, fan_out = shapes[module]
            want = [shape[0] if shape else 0, fan_in] if m["ab"] == "A" else [fan_out, shape[-1]]
            if len(shape) == 2 and shape == want:
                continue
            problem = f"shape {shape}; {base} needs {want}"
        raise UsageError(
            f"{weights}: {name}: {problem}",
            hint="the adapter was trained on another base model; pass --model with that base",
        )
