"""Shell completions: the committed scripts match the CLI, and they complete for real."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from swallowctl.completion import SHELLS, write_all

COMPLETIONS = Path(__file__).resolve().parent.parent / "completions"


def test_committed_completions_are_current(tmp_path: Path) -> None:
    write_all(tmp_path)
    for filename, _ in SHELLS.values():
        fresh = (tmp_path / filename).read_text(encoding="utf-8")
        committed = (COMPLETIONS / filename).read_text(encoding="utf-8")
        assert committed == fresh, f"completions/{filename} is stale: run `make completions`"


def bash_complete(*words: str) -> list[str]:
    script = (
        f"source {COMPLETIONS / 'swallowctl.bash'}\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
        "_swallowctl 2>/dev/null; printf '%s\\n' \"${COMPREPLY[@]}\"\n"
    )
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_bash_completes_commands_options_and_config_keys() -> None:
    assert bash_complete("swallowctl", "tr") == ["train"]
    assert set(bash_complete("swallowctl", "config", "")) >= {"init", "show", "validate"}
    assert "--config" in bash_complete("swallowctl", "train", "--c")
    assert "ppo.lr=" in bash_complete("swallowctl", "train", "--set", "ppo.l")
    assert "generation.temperature=" in bash_complete(
        "swallowctl", "config", "show", "--set", "gen"
    )


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completes() -> None:
    script = f"source {COMPLETIONS / 'swallowctl.fish'}; complete -C 'swallowctl config '"
    out = subprocess.run(["fish", "-c", script], capture_output=True, text=True, check=True)
    assert {line.split("\t")[0] for line in out.stdout.splitlines()} >= {"init", "show"}


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_script_parses() -> None:
    subprocess.run(["zsh", "-n", str(COMPLETIONS / "_swallowctl")], check=True)
