"""Hostile and broken input, through the command line as a user meets it.

Every case must end in one clear `error:` line naming the problem (file, line, key or flag),
exit 2 for what the user can fix (1 for runtime failures), no traceback, and no file of the
user's changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from swallowctl.cli import app

TINY = "model.name_or_path=builtin:tiny-ja"

# (name, files to create {name: bytes}, argv (FILE paths as {name}), exit code, fragment)
CASES: list[tuple[str, dict[str, bytes], list[str], int, str]] = [
    # --- configs -----------------------------------------------------------------------------
    (
        "unknown key",
        {"c.yaml": b"ppo:\n  lerning_rate: 1\n"},
        ["train", "-c", "{c.yaml}", "--dry-run"],
        2,
        "c.yaml:2: ppo.lerning_rate: unknown key",
    ),
    (
        "wrong type",
        {"c.yaml": b"ppo:\n  lr: fast\n"},
        ["train", "-c", "{c.yaml}", "--dry-run"],
        2,
        "c.yaml:2: ppo.lr: Input should be a valid",
    ),
    (
        "negative size",
        {"c.yaml": b"ppo:\n  per_device_train_batch_size: -4\n"},
        ["train", "-c", "{c.yaml}", "--dry-run"],
        2,
        "c.yaml:2: ppo.per_device_train_batch_size",
    ),
    (
        "zero epochs",
        {"c.yaml": b"ppo:\n  ppo_epochs: 0\n"},
        ["train", "-c", "{c.yaml}", "--dry-run"],
        2,
        "c.yaml:2: ppo.ppo_epochs",
    ),
    (
        "zero grad accum",
        {"c.yaml": b"ppo:\n  grad_accum_steps: 0\n"},
        ["train", "-c", "{c.yaml}", "--dry-run"],
        2,
        "c.yaml:2: ppo.grad_accum_steps",
    ),
    (
        "top_p above 1",
        {"c.yaml": b"generation:\n  top_p: 1.5\n"},
        ["train", "-c", "{c.yaml}", "--dry-run"],
        2,
        "c.yaml:2: generation.top_p",
    ),
    (
        "updates and episodes",
        {"c.yaml": b"ppo:\n  total_updates: 2\n  total_episodes: 9\n"},
        ["train", "-c", "{c.yaml}", "--dry-run"],
        2,
        "ppo.total_episodes: give total_updates or",
    ),
    (
        "contradiction",
        {"c.yaml": b"ppo:\n  temperature: 0.2\ngeneration:\n  temperature: 0.9\n"},
        ["train", "-c", "{c.yaml}", "--dry-run"],
        2,
        "contradicts generation.temperature",
    ),
    (
        "yaml syntax",
        {"c.yaml": b"ppo:\n  lr: [1,\n"},
        ["train", "-c", "{c.yaml}", "--dry-run"],
        2,
        ": YAML syntax error",
    ),
    (
        "binary junk",
        {"c.yaml": bytes(range(256))},
        ["train", "-c", "{c.yaml}", "--dry-run"],
        2,
        "c.yaml",
    ),
    (
        "empty config",
        {"c.yaml": b""},
        ["train", "-c", "{c.yaml}", "--dry-run"],
        2,
        "the config file is empty",
    ),
    (
        "top level list",
        {"c.yaml": b"- ppo\n"},
        ["doctor", "-c", "{c.yaml}"],
        2,
        "the top level must be a mapping",
    ),
    (
        "duplicate key",
        {"c.yaml": b"ppo:\n  lr: 1\n  lr: 2\n"},
        ["config", "validate", "{c.yaml}"],
        2,
        "c.yaml:3: ppo.lr: duplicate key",
    ),
    (
        "unknown mode",
        {"c.yaml": b"data:\n  mode: chatt\n"},
        ["train", "-c", "{c.yaml}", "--dry-run"],
        2,
        "did you mean 'chat'?",
    ),
    (
        "auto entropy, no target",
        {"c.yaml": b"ppo:\n  entropy_auto_adjust: true\n"},
        ["train", "-c", "{c.yaml}", "--dry-run"],
        2,
        "needs ppo.entropy_target",
    ),
    (
        "typo section",
        {"c.yaml": b"lora_:\n  r: 8\n"},
        ["config", "validate", "{c.yaml}"],
        2,
        "unknown section; did you mean 'lora'?",
    ),
    (
        "kl estimator",
        {"c.yaml": b"ppo:\n  kl_estimator: k2\n"},
        ["tune-memory", "-c", "{c.yaml}", "--vram", "24"],
        2,
        "ppo.kl_estimator",
    ),
    # --- reward specs ---------------------------------------------------------------------------
    (
        "reward two sources",
        {"c.yaml": b"rewards:\n  - function: polite\n    url: http://x\n"},
        ["train", "-c", "{c.yaml}", "--dry-run"],
        2,
        "exactly one of function, model or url",
    ),
    (
        "reward module missing",
        {"c.yaml": b"rewards:\n  - function: no_such_mod:f\n"},
        ["train", "-c", "{c.yaml}", "--dry-run"],
        2,
        "no_such_mod",
    ),
    (
        "reward builtin unknown",
        {"c.yaml": b"rewards:\n  - function: politeness\n"},
        ["train", "-c", "{c.yaml}", "--dry-run"],
        2,
        "politeness",
    ),
    (
        "reward bad kwarg",
        {"c.yaml": b"rewards:\n  - function: length_window\n    kwargs: {min_char: 3}\n"},
        ["train", "-c", "{c.yaml}", "--dry-run"],
        2,
        "min_char",
    ),
    # --- data -----------------------------------------------------------------------------------
    (
        "bad json line",
        {"p.jsonl": b'{"prompt": "a"}\n{"prompt": \n'},
        ["train", "--set", "data.prompts={p.jsonl}", "--dry-run"],
        2,
        "p.jsonl:2:",
    ),
    (
        "no prompt field",
        {"p.jsonl": b'{"text": "a"}\n'},
        ["train", "--set", "data.prompts={p.jsonl}", "--dry-run"],
        2,
        "p.jsonl:1:",
    ),
    (
        "empty prompt",
        {"p.jsonl": b'{"prompt": ""}\n'},
        ["train", "--set", "data.prompts={p.jsonl}", "--dry-run"],
        2,
        "p.jsonl:1:",
    ),
    (
        "prompt wrong type",
        {"p.jsonl": b'{"prompt": 3}\n'},
        ["train", "--set", "data.prompts={p.jsonl}", "--dry-run"],
        2,
        "p.jsonl:1:",
    ),
    (
        "bad role",
        {"p.jsonl": b'{"messages": [{"role": "robot", "content": "x"}]}\n'},
        ["train", "--set", "data.prompts={p.jsonl}", "--dry-run"],
        2,
        "p.jsonl:1:",
    ),
    (
        "huge line",
        {"p.jsonl": b'{"prompt": "' + b"a" * 1_100_000 + b'"}\n'},
        ["train", "--set", "data.prompts={p.jsonl}", "--dry-run"],
        2,
        "p.jsonl:1:",
    ),
    (
        "non utf-8 data",
        {"p.jsonl": b'{"prompt": "\xff\xfe"}\n'},
        ["train", "--set", "data.prompts={p.jsonl}", "--dry-run"],
        2,
        "p.jsonl:1:",
    ),
    (
        "empty data",
        {"p.jsonl": b""},
        ["train", "--set", "data.prompts={p.jsonl}", "--dry-run"],
        2,
        "p.jsonl:1: the file is empty",
    ),
    (
        "blank data",
        {"p.jsonl": b"\n\n  \n"},
        ["train", "--set", "data.prompts={p.jsonl}", "--dry-run"],
        2,
        "p.jsonl",
    ),
    (
        "missing data file",
        {},
        ["train", "--set", "data.prompts=nope.jsonl", "--dry-run"],
        2,
        "nope.jsonl",
    ),
    # --- command-line arguments -------------------------------------------------------------------
    ("unknown backend", {}, ["doctor", "--backend", "tpu"], 2, "tpu"),
    ("missing config", {}, ["train", "-c", "nope.yaml", "--dry-run"], 2, "no such config file"),
    ("config is a dir", {"d/x": b""}, ["config", "validate", "{d/x}/.."], 2, ""),
    ("set without =", {}, ["config", "show", "--set", "ppo.lr"], 2, "expected KEY.PATH=VALUE"),
    ("set unknown key", {}, ["config", "show", "--set", "ppo.lrr=1"], 2, "did you mean 'lr'?"),
    ("set bad value", {}, ["config", "show", "--set", "ppo.lr=abc"], 2, "--set: ppo.lr"),
    ("verbose and quiet", {}, ["config", "show", "-v", "-q"], 2, "contradict"),
    ("download typo", {}, ["download", "swalow-8b", "--dry-run"], 2, "unknown model 'swalow-8b'"),
    ("download builtin", {}, ["download", "builtin:tiny-ja", "--dry-run"], 2, "builtin:tiny-ja"),
    ("mlx twin unknown", {}, ["download", "org/unknown-model", "--mlx", "--dry-run"], 2, "--mlx"),
    ("negative vram", {}, ["tune-memory", "--model", "swallow-8b", "--vram", "-3"], 2, "--vram"),
    (
        "write without config",
        {},
        ["tune-memory", "--model", "swallow-8b", "--vram", "24", "--write"],
        2,
        "--write needs",
    ),
    ("init over a file", {"f": b"x"}, ["config", "init", "{f}/new.yaml"], 2, "cannot write"),
    (
        "init existing",
        {"c.yaml": b"ppo: {}\n"},
        ["config", "init", "{c.yaml}"],
        2,
        "already exists",
    ),
    # --- where output goes -----------------------------------------------------------------------
    (
        "train output under a file",
        {"f": b"x"},
        ["train", "--set", TINY, "--set", "output.dir={f}/run", "--dry-run"],
        2,
        "is a file, not a folder",
    ),
    (
        "train output is a file",
        {"f": b"x"},
        ["train", "--set", TINY, "--set", "output.dir={f}", "--dry-run"],
        2,
        "is a file, not a folder",
    ),
    (
        "infer output under a file",
        {"in.jsonl": b'{"prompt": "a"}\n', "f": b"x"},
        ["infer", "--model", "builtin:tiny-ja", "--input", "{in.jsonl}", "--output", "{f}/o.jsonl"],
        2,
        "is a file, not a folder",
    ),
    ("unknown command", {}, ["trian"], 2, ""),
    ("bad flag", {}, ["train", "--lr", "3"], 2, ""),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    ("name", "files", "argv", "code", "fragment"), CASES, ids=[c[0] for c in CASES]
)
def test_hostile_input(
    name: str,
    files: dict[str, bytes],
    argv: list[str],
    code: int,
    fragment: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    args = []
    for a in argv:
        for rel in files:
            a = a.replace("{" + rel + "}", str(tmp_path / rel))
        args.append(a)
    before = _snapshot(tmp_path)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == code, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    if "Usage:" not in r.stderr:  # Typer's own usage errors have their own box
        assert len(errors) >= 1, r.stderr
        assert fragment in "\n".join(errors), r.stderr
    assert _snapshot(tmp_path) == before, "the user's files changed"


def test_at_least_forty_cases() -> None:
    assert len(CASES) >= 40


def test_a_fake_token_never_leaks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "hf_" + "SeCrEt" * 6
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    sets = [
        f"--set={s}"
        for s in (
            TINY,
            f"output.dir={run}",
            "ppo.total_updates=1",
            "ppo.per_device_train_batch_size=2",
            "ppo.grad_accum_steps=1",
            "generation.max_new_tokens=4",
            "logging.report_to=[]",
        )
    ]
    outputs = []
    for argv in (
        ["config", "show", *sets, "--json"],
        ["doctor", "--json", *sets],
        ["version", "--json"],
        ["train", *sets, "-v"],
    ):
        r = CliRunner().invoke(app, argv)
        outputs.append(r.stdout + r.stderr)
    assert r.exit_code == 0, r.stderr
    assert all(secret not in out for out in outputs)
    for path in run.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    manifest = json.loads((run / "final" / "manifest.json").read_text())
    assert secret not in json.dumps(manifest)


def test_a_fake_token_never_leaks_from_any_other_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hubserver import HubServer, use_hub
    from test_infer import make_adapter

    secret = "hf_" + "ToKeN" * 7
    root = Path(__file__).resolve().parent.parent
    adapter = make_adapter(tmp_path / "run" / "final")
    gated = {"config.json": b"{}", "tokenizer.json": b"{}", "model.safetensors": b"w" * 64}
    with HubServer(repos={"org/gated": gated}, gated={"org/gated"}) as server:
        server.allowed_tokens.add(secret)
        use_hub(monkeypatch, server, tmp_path)
        monkeypatch.setenv("HF_TOKEN", secret)
        monkeypatch.chdir(root)  # env check imports examples.intervention_env from here
        outputs = []
        for argv in (
            ["download", "org/gated", "--local-dir", str(tmp_path / "dl"), "-v"],
            ["download", "org/gated", "--json"],
            ["infer", "--adapter", str(adapter), "--prompt", "x", "--max-new-tokens", "3", "-v"],
            ["export", str(adapter), "--format", "mlx-adapter", "--output", str(tmp_path / "ex")],
            ["tune-memory", "--model", "swallow-8b", "--vram", "24", "--json"],
            ["env", "check", "examples.intervention_env:InterventionEnv", "--mode",
             "intervention", "--episodes", "1", "--json", "-v"],
        ):  # fmt: skip
            r = CliRunner().invoke(app, argv)
            assert r.exit_code == 0, (argv, r.stderr)
            outputs.append(r.stdout + r.stderr)
        assert any(req.authorized for req in server.requests)  # the token was really used
    assert all(secret not in out for out in outputs)
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.name not in ("token", "stored_tokens"):
            assert secret.encode() not in path.read_bytes(), path
