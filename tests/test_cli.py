"""The command line as a user meets it: help, exit codes, one-line errors, config commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from swallowctl import __version__
from swallowctl.cli import app

FIXTURES = Path(__file__).parent / "fixtures"
COMMANDS = ["download", "doctor", "tune-memory", "train", "infer", "export", "config", "version"]
HEAVY = ["torch", "transformers", "peft", "bitsandbytes", "accelerate", "trl", "mlx", "mlx_lm"]

runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_help_lists_every_command_and_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "sys.argv = ['swallowctl', '--help']\n"
        "from swallowctl.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    for name in COMMANDS:
        assert name in out
    assert "HEAVY []" in out


def test_python_dash_m_works() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "swallowctl", "version"], capture_output=True, text=True
    )
    assert r.returncode == 0
    assert r.stdout.startswith(f"swallowctl {__version__}")


def test_validate_seed_config() -> None:
    code, out, err = run("config", "validate", str(FIXTURES / "seed_config.yaml"))
    assert code == 0, err
    assert "is valid" in out


def test_validate_origin_config_with_warnings() -> None:
    code, out, err = run("config", "validate", "-c", str(FIXTURES / "origin_config.yaml"))
    assert code == 0, err
    assert "(3 warnings)" in out
    assert "ppo.ref_device is no longer needed" in err


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("ppo:\n  lerning_rate: 1\n", "c.yaml:2: ppo.lerning_rate: unknown key"),
        ("ppo:\n  lr: fast\n", "c.yaml:2: ppo.lr: Input should be a valid number"),
        ("ppo:\n  lr: [1,\n", "c.yaml:3: YAML syntax error"),
    ],
)
def test_broken_config_one_line_exit_2(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    code, out, err = run("config", "validate", str(path))
    assert code == 2
    assert out == ""
    error_lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(error_lines) == 1
    assert fragment in error_lines[0]
    assert "Traceback" not in err


def test_missing_config_exit_2_with_hint(tmp_path: Path) -> None:
    code, _, err = run("config", "validate", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert "no such config file" in err
    assert "hint: create one with 'swallowctl config init" in err


def test_verbose_shows_the_traceback(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("ppo:\n  lr: fast\n")
    code, _, err = run("config", "validate", str(path), "--verbose")
    assert code == 2
    assert "Traceback" in err


def test_unexpected_errors_are_one_line_without_verbose(monkeypatch: pytest.MonkeyPatch) -> None:
    import swallowctl.core.config as config

    def boom(*_a: object, **_k: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(config, "load_config", boom)
    code, _, err = run("config", "validate")
    assert code == 1
    assert "error: unexpected RuntimeError: disk on fire" in err
    assert "--verbose" in err
    assert "Traceback" not in err


def test_bad_set_is_a_usage_error() -> None:
    code, _, err = run("config", "show", "--set", "ppo.lr")
    assert code == 2
    assert "expected KEY.PATH=VALUE" in err


def test_verbose_and_quiet_contradict() -> None:
    code, _, err = run("config", "validate", "-v", "-q")
    assert code == 2
    assert "contradict" in err


def test_config_init_show_validate(tmp_path: Path) -> None:
    path = tmp_path / "my.yaml"
    code, _, err = run("config", "init", str(path))
    assert code == 0, err
    assert path.read_text(encoding="utf-8").startswith("# swallowctl config")
    code, _, err = run("config", "init", str(path))
    assert code == 2
    assert "already exists" in err
    assert run("config", "init", str(path), "--force")[0] == 0
    assert run("config", "validate", str(path))[0] == 0

    code, out, _ = run("config", "show", "-c", str(path), "--set", "ppo.lr=3e-5", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["config"]["ppo"]["lr"] == 3e-5
    assert doc["sizes"]["samples_per_update"] == 8  # defaults: 4 x 2 x 1
    code, out, _ = run("config", "show", "-c", str(path))
    assert yaml.safe_load(out)["model"]["name_or_path"].endswith("Swallow-8B-Instruct-v0.5")
    assert "# what this means per run" in out


def test_two_config_files_is_a_usage_error(tmp_path: Path) -> None:
    code, _, err = run("config", "validate", "a.yaml", "-c", "b.yaml")
    assert code == 2
    assert "two config files" in err


def test_version_json() -> None:
    code, out, _ = run("version", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["swallowctl"] == __version__
    assert "torch" in doc["packages"]


def test_example_configs_are_valid() -> None:
    for path in (Path(__file__).parent.parent / "examples").glob("*.yaml"):
        code, _, err = run("config", "validate", str(path))
        assert code == 0, f"{path}: {err}"
