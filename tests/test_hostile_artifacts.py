"""Hostile artifacts, through the command line: broken adapters and checkpoints, hostile
environment classes, unwritable outputs.

As in test_hostile.py, each case must end in one `error:` line naming the problem, exit 2 for
what the user can fix (1 for runtime failures), no traceback, no file of the user's changed and
no half-written output.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_infer import make_adapter
from typer.testing import CliRunner

from swallowctl.cli import app
from swallowctl.ppo import checkpoint

TINY = "builtin:tiny-ja"
WEIGHTS = "adapter_model.safetensors"


def _json_edit(name: str, edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        data = json.loads((d / name).read_text())
        edit(data)
        (d / name).write_text(json.dumps(data))

    return apply


def _tensors_edit(edit: Callable[[dict[str, torch.Tensor]], dict]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        save_file(edit(load_file(d / WEIGHTS)), str(d / WEIGHTS))

    return apply


def _wider_a(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # An adapter of a model with a larger hidden size: every A is [r, hidden + 3].
    return {
        k: torch.zeros(v.shape[0], v.shape[1] + 3) if "lora_A" in k else v for k, v in t.items()
    }


def _deeper(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace("layers.0.", "layers.7."): v for k, v in t.items()}


def _set(key: str, value: object) -> Callable[[dict], object]:
    return lambda d: d.__setitem__(key, value)


def _unlink(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).unlink()


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(data)


def _truncate(name: str, size: int) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes((d / name).read_bytes()[:size])


INFER = ["infer", "--prompt", "x", "--max-new-tokens", "2", "--adapter", "{adapter}"]
MLX_ADAPTER = ["export", "{adapter}", "--format", "mlx-adapter", "--output", "{out}"]
MERGED = ["export", "{adapter}", "--format", "merged", "--output", "{out}"]

# (name, how to break RUN/final, argv, exit code, fragment of the error line)
ADAPTER_CASES: list[tuple[str, Callable[[Path], None], list[str], int, str]] = [
    ("export, no adapter config", _unlink("adapter_config.json"), MLX_ADAPTER, 2, "no adapter_con"),
    ("export, no weights", _unlink(WEIGHTS), MERGED, 2, f"no {WEIGHTS}"),
    ("infer, junk weights", _write(WEIGHTS, b"\x00junk" * 9), INFER, 2, "not a readable safet"),
    ("export, torn weights", _truncate(WEIGHTS, 100), MLX_ADAPTER, 2, "not a readable safet"),
    ("infer, other hidden size", _tensors_edit(_wider_a), INFER, 2, f"{TINY} needs [8, "),
    ("mlx-adapter, other hidden", _tensors_edit(_wider_a), MLX_ADAPTER, 2, f"{TINY} needs [8, "),
    ("merged, more layers", _tensors_edit(_deeper), MERGED, 2, f"{TINY} has 2 layers"),
    (
        "infer, unknown target modules",
        _json_edit("adapter_config.json", _set("target_modules", ["zzz_proj"])),
        INFER,
        1,
        "could not apply the adapter",
    ),
    (
        "merged, unknown target modules",
        _json_edit("adapter_config.json", _set("target_modules", ["zzz_proj"])),
        MERGED,
        1,
        "could not apply the adapter",
    ),
    ("adapter config a list", _write("adapter_config.json", b"[1]"), INFER, 2, "a JSON object"),
    ("manifest junk", _write("manifest.json", b"{base"), MLX_ADAPTER, 2, "not readable JSON"),
    (
        "manifest of another version",
        _json_edit("manifest.json", _set("base_model", TINY)),
        INFER,
        2,
        "base_model is str",
    ),
    (
        "run dir without final/",
        lambda d: d.rename(d.parent / "checkpoint-2"),
        [*INFER[:-1], "{run}"],
        2,
        "no adapter_config.json",
    ),
    ("export a file", lambda d: None, ["export", "{adapter}/manifest.json"], 2, ""),
    (
        "export output under a file",
        lambda d: None,
        [*MLX_ADAPTER[:-1], "{adapter}/manifest.json/x"],
        2,
        "is a file, not a folder",
    ),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def check_one_error(r, code: int, fragment: str) -> None:  # type: ignore[no-untyped-def]
    assert r.exit_code == code, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    if "Usage:" in r.stderr:  # Typer's own usage errors have their own box
        return
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr
    assert fragment in errors[0], r.stderr


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tmp_path_factory.mktemp("good") / "final")


@pytest.mark.parametrize(
    ("name", "breaks", "argv", "code", "fragment"),
    ADAPTER_CASES,
    ids=[c[0] for c in ADAPTER_CASES],
)
def test_hostile_adapters(
    name: str,
    breaks: Callable[[Path], None],
    argv: list[str],
    code: int,
    fragment: str,
    good_adapter: Path,
    tmp_path: Path,
) -> None:
    adapter = tmp_path / "run" / "final"
    shutil.copytree(good_adapter, adapter)
    breaks(adapter)
    out = tmp_path / "out"
    subs = {"{adapter}": str(adapter), "{out}": str(out), "{run}": str(tmp_path / "run")}
    args = [subs.get(a, a).replace("{adapter}", str(adapter)) for a in argv]
    before = _snapshot(tmp_path)
    r = CliRunner().invoke(app, args, env={"HF_HUB_OFFLINE": "1"})
    check_one_error(r, code, fragment)
    assert _snapshot(tmp_path) == before, "the user's files changed"
    assert not out.exists(), "half-written output"
    assert not list((tmp_path / "run").glob("export-*")), "half-written output"


# --- checkpoints from another version ----------------------------------------------------------

TRAIN = (
    f"model.name_or_path={TINY}",
    "ppo.total_updates=2",
    "ppo.per_device_train_batch_size=2",
    "ppo.grad_accum_steps=1",
    "ppo.ppo_epochs=1",
    "generation.max_new_tokens=2",
    "output.save_steps=1",
    "logging.report_to=[]",
)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    r = CliRunner().invoke(
        app, ["train", f"--set=output.dir={run}", *(f"--set={s}" for s in TRAIN)]
    )
    assert r.exit_code == 0, r.stderr
    return run


CHECKPOINT_CASES: list[tuple[str, Callable[[Path], None], str]] = [
    (
        "state of another version",
        _json_edit(checkpoint.STATE, lambda d: d.pop("python_random")),
        "not a checkpoint this swallowctl can resume (no python_random)",
    ),
    ("torn tensor state", _truncate(checkpoint.TENSORS, 1000), "unreadable checkpoint"),
    ("junk json state", _write(checkpoint.STATE, b"\xff\xfe{"), "unreadable checkpoint"),
]


@pytest.mark.parametrize(
    ("name", "breaks", "fragment"), CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES]
)
def test_resume_from_a_checkpoint_it_cannot_read(
    name: str, breaks: Callable[[Path], None], fragment: str, trained_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    breaks(run / "checkpoint-1")
    before = _snapshot(tmp_path)
    argv = ["train", f"--set=output.dir={run}", *(f"--set={s}" for s in TRAIN), "--resume"]
    r = CliRunner().invoke(app, argv)
    check_one_error(r, 2, fragment)
    assert f"{run / 'checkpoint-1'}:" in r.stderr
    assert _snapshot(tmp_path) == before, "the user's files changed"


# --- environment classes -----------------------------------------------------------------------

ENVS = """
import threading
from swallowctl.ppo.environment import Observation, StepResult

class Good:
    def __init__(self, settings, sections):
        self.bad = settings.get("bad")
    def reset(self, seed):
        if self.bad == "reset-raises":
            raise ConnectionError("the simulator is down")
    def observe(self):
        if self.bad == "observe-raises":
            raise KeyError("speaker")
        if self.bad == "observe-none":
            return None
        if self.bad == "observe-hangs":
            threading.Event().wait(30)
        return Observation(fields={"prompt": "x"}, state={})
    def step(self, completion, choice, state):
        if self.bad == "step-str":
            return "1.0"
        return StepResult(0.0, True, {})

class NoStep:
    def __init__(self, settings, sections): pass
    def reset(self, seed): pass
    def observe(self): return Observation(fields={"prompt": "x"}, state={})

class InitRaises:
    def __init__(self, settings, sections):
        raise RuntimeError("needs an API key")
    def reset(self, seed): pass
    def observe(self): pass
    def step(self, completion, choice, state): pass

NOT_A_CLASS = 3
"""

ENV_SETS = (
    "modes.plain.system=null",
    "modes.plain.template='{prompt}'",
    "data.mode=plain",
    "environment.timeout_s=0.5",
    "environment.retries=0",
)

# (name, class, settings.bad, command, exit code, fragment)
ENV_CASES: list[tuple[str, str, str, str, int, str]] = [
    ("missing step", "NoStep", "none", "env check", 2, "has no step method"),
    ("missing step, train", "NoStep", "none", "train", 2, "has no step method"),
    ("not a class", "NOT_A_CLASS", "none", "env check", 2, "NOT_A_CLASS"),
    ("no such class", "Nope", "none", "train", 2, "Nope"),
    ("init raises", "InitRaises", "none", "env check", 1, "needs an API key"),
    ("reset raises", "Good", "reset-raises", "env check", 1, "Good.reset"),
    ("reset raises, train", "Good", "reset-raises", "train", 1, "Good.reset"),
    ("observe raises", "Good", "observe-raises", "env check", 1, "Good.observe"),
    ("observe returns None", "Good", "observe-none", "env check", 1, "Good.observe"),
    ("observe hangs", "Good", "observe-hangs", "env check", 1, "timed out after 0.5s"),
    ("observe hangs, train", "Good", "observe-hangs", "train", 1, "timed out after 0.5s"),
    ("step returns str", "Good", "step-str", "train", 1, "Good.step"),
]


@pytest.mark.parametrize(
    ("name", "cls", "bad", "command", "code", "fragment"),
    ENV_CASES,
    ids=[c[0] for c in ENV_CASES],
)
def test_hostile_environment_classes(
    name: str,
    cls: str,
    bad: str,
    command: str,
    code: int,
    fragment: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = f"hostile_envs_{abs(hash(name))}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(ENVS))
    monkeypatch.syspath_prepend(str(tmp_path))
    sets = [
        *ENV_SETS,
        f"environment.entrypoint={module}:{cls}",
        f"environment.settings.bad={bad}",
    ]
    if command == "train":
        sets += [*TRAIN, f"output.dir={tmp_path / 'run'}"]
    argv = [*command.split(), *(f"--set={s}" for s in sets)]
    before = _snapshot(tmp_path)
    r = CliRunner().invoke(app, argv)
    check_one_error(r, code, fragment)
    after = _snapshot(tmp_path)
    for path in set(after) - set(before):  # a failed run may leave its logs, never a model
        assert path.startswith("run/") and "final" not in path and "checkpoint" not in path, path
    assert {k: after[k] for k in before} == before, "the user's files changed"
