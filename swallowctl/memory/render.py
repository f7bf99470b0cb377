"""tune-memory's result as rich tables (for the terminal) and as one JSON document."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from swallowctl.memory.phases import PHASE_TITLES, Estimate, Phase
from swallowctl.memory.terms import GIB, Settings
from swallowctl.memory.tuner import TuneResult


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


_HEADERS = {
    "rollout": "rollout",
    "scoring": "scoring",
    "update:loss": "update:loss",
    "update:backward": "update:bwd",
}
_LAST = ("allocator_slack", "cuda_context")


def breakdown_table(title: str, est: Estimate) -> Table:
    """Terms as rows, phases as columns (GiB); the peak phase is starred."""
    peak = est.peak.name
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("term", no_wrap=True)
    for p in est.phases:
        star = "*" if p.name == peak else ""
        table.add_column(_HEADERS.get(p.name, p.name) + star, justify="right", no_wrap=True)
    labels: dict[str, str] = {}
    for p in est.phases:
        for t in p.terms:
            labels.setdefault(t.key, t.label)
    keys = [k for k in labels if k not in _LAST] + [k for k in _LAST if k in labels]
    for key in keys:
        cells = [_gib(p.bytes_of(key)) if _has(p, key) else "-" for p in est.phases]
        table.add_row(labels[key], *cells)
    table.add_section()
    table.add_row(Text("total", style="bold"), *(_gib(p.total) for p in est.phases))
    return table


def _has(phase: Phase, key: str) -> bool:
    return any(t.key == key for t in phase.terms)


def _legend() -> Text:
    return Text(
        "phases: "
        + "; ".join(f"{_HEADERS[k]} = {v}" for k, v in PHASE_TITLES.items())
        + "; * = peak",
        style="dim",
    )


def _settings_line(s: Settings) -> str:
    gc = "on" if s.gradient_checkpointing else "off"
    batches = f"micro-batch {s.micro_batch} x grad-accum {s.grad_accum} (effective " + (
        f"{s.micro_batch * s.grad_accum}), generation batch {s.rollout_batch} "
        f"({s.rollout_batch // s.num_generations} prompts x {s.num_generations}), "
        f"checkpointing {gc}"
        if s.critic_free  # TRL: one generation call per update, no logits chunk to set
        else f"{s.micro_batch * s.grad_accum}), rollout batch {s.rollout_batch}, "
        f"checkpointing {gc}, logits chunk {s.logits_chunk}"
    )
    return (
        f"{batches}; prompt {s.prompt_tokens} + response {s.response_tokens} tokens, "
        f"LoRA r={s.lora_r}"
    )


def renderables(result: TuneResult, written: list[str] | None = None) -> list[RenderableType]:
    """Everything tune-memory prints, in order."""
    cur, budget = result.current_estimate, result.budget
    out: list[RenderableType] = [
        Text.assemble(("model: ", "bold"), result.model),
        Text.assemble(("budget: ", "bold"), f"{budget.gib:.1f} GiB ({budget.source})"),
        Text.assemble(("now: ", "bold"), _settings_line(result.current)),
        Text.assemble(
            ("estimate now: ", "bold"),
            f"peak {_gib(cur.peak_bytes)} GiB in {cur.peak.title}",
        ),
    ]
    for line in result.not_counted:
        out.append(Text.assemble(("note: ", "yellow"), line))
    if result.suggested is None or result.suggested_estimate is None:
        return out + _nothing_fits(result)
    est = result.suggested_estimate
    out += [breakdown_table("suggested settings, GiB per phase", est), _legend()]
    out.append(Text.assemble(("suggested: ", "bold green"), _settings_line(result.suggested)))
    out.append(
        Text.assemble(
            ("peak: ", "bold"),
            f"{_gib(est.peak_bytes)} of {result.budget.gib:.2f} GiB, in {est.peak.title}",
        )
    )
    if not result.changes:
        out.append(Text("your settings are already the fastest that fit", style="green"))
    elif written:
        out += [Text.assemble(("wrote: ", "bold"), line) for line in written]
    else:
        out.append(Text.assemble(("paste: ", "bold"), result.set_line))
    return out


def _nothing_fits(result: TuneResult) -> list[RenderableType]:
    est = result.minimal_estimate
    out: list[RenderableType] = [
        breakdown_table("smallest settings tried, GiB per phase", est),
        _legend(),
        Text.assemble(
            ("does not fit: ", "bold red"),
            f"even micro-batch 1, {_smallest_rollout(result)} and checkpointing on peak at "
            f"{_gib(est.peak_bytes)} GiB ({est.peak.title}) against {result.budget.gib:.2f} GiB",
        ),
    ]
    out += [Text.assemble(("give up: ", "bold yellow"), a.text) for a in result.advice]
    return out


def _smallest_rollout(result: TuneResult) -> str:
    s = result.current
    if s.critic_free:
        return (
            f"the generation batch of {s.rollout_batch} answers (fixed by the samples per update)"
        )
    return "rollout batch 1"


def to_json(result: TuneResult, written: list[str] | None = None) -> dict[str, Any]:
    """The same content as `renderables`, as plain data."""
    return {
        "model": result.model,
        "architecture": asdict(result.architecture),
        "budget": {"bytes": result.budget.bytes, "gib": result.budget.gib},
        "budget_source": result.budget.source,
        "fits": result.fits,
        "current": _settings_json(result.current, result.current_estimate),
        "suggested": (
            _settings_json(result.suggested, result.suggested_estimate)
            if result.suggested is not None and result.suggested_estimate is not None
            else None
        ),
        "smallest_tried": None if result.fits else _estimate_json(result.minimal_estimate),
        "changes": result.changes,
        "set": result.set_line,
        "advice": [asdict(a) for a in result.advice],
        "written": written or [],
        "not_counted": list(result.not_counted),
    }


def _settings_json(s: Settings, est: Estimate) -> dict[str, Any]:
    settings = {k: v for k, v in asdict(s).items() if k != "reward_models"}
    return {"settings": settings, **_estimate_json(est)}


def _estimate_json(est: Estimate) -> dict[str, Any]:
    return {
        "peak_phase": est.peak.name,
        "peak_bytes": est.peak_bytes,
        "phases": [
            {
                "name": p.name,
                "total_bytes": p.total,
                "terms": [asdict(t) for t in p.terms],
            }
            for p in est.phases
        ],
    }


def probe_table(runs: list[Any]) -> Table:
    """`--probe`: estimate vs measured peak for each setting run on the GPU."""
    t = Table(title="measured on this GPU (one rollout + one update)", header_style="bold")
    for c in ("run", "settings", "estimate GiB", "allocated GiB", "reserved GiB", ""):
        t.add_column(c)
    for r in runs:
        settings = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in r.changes.items()) or "as is"
        t.add_row(
            r.label,
            settings,
            f"{r.estimate_gib:.2f}" if r.estimate_gib is not None else "-",
            f"{r.allocated_gib:.2f}" if r.allocated_gib is not None else "-",
            f"{r.reserved_gib:.2f}" if r.reserved_gib is not None else "-",
            "OOM" if r.oom else "",
        )
    return t
