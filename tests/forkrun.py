"""Test-only: run `swallowctl` commands in forked children of one warm process, and kill them.

Importing torch and transformers takes most of a tiny run's time; a server imports them once and
forks a child per command, which runs the real CLI entry point and exits (or is SIGKILLed) like
any `swallowctl` process. `kill="module:attr:n:when[:match]"` SIGKILLs the child on the n-th call
of `module.attr` (a function or `Class.method`) whose arguments' text contains `match`, before or
after the call: exact moments, with no hooks in product code. `kill_after_s` kills it by the
clock instead. `when="sigint"` sends a Ctrl-C after the call; `when="enospc"` makes that call
and every later one fail with ENOSPC, as a full disk does.

    with ForkRunner() as runner:
        rc, stderr = runner.run(["train", ...], kill="swallowctl.ppo.algo:policy_loss:1:after")
"""

from __future__ import annotations

import errno
import functools
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WARM = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "safetensors.torch",
    "swallowctl.cli",
    "swallowctl.ppo.trainer",
    "swallowctl.ppo.policy",
)


def install_kill(spec: str) -> None:
    """Wrap the named callable so that its n-th matching call SIGKILLs this process."""
    module_name, path, count, when, *rest = spec.split(":")
    match, n = (rest[0] if rest else ""), int(count)
    owner: Any = importlib.import_module(module_name)
    *parents, attr = path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    real = getattr(owner, attr)
    calls = [0]

    @functools.wraps(real)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        hit = match in repr(args) + repr(kwargs)
        calls[0] += hit
        if hit and calls[0] == n and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        if hit and calls[0] >= n and when == "enospc":  # a full disk, from here on
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        out = real(*args, **kwargs)
        if hit and calls[0] == n and when in ("after", "sigint"):
            os.kill(os.getpid(), signal.SIGKILL if when == "after" else signal.SIGINT)
        return out

    setattr(owner, attr, wrapper)


def _child(job: dict[str, Any]) -> None:
    signal.alarm(300)  # a child that hangs dies of SIGALRM (rc -14) instead of hanging the tests
    os.environ.update(job["env"])
    with open(job["stderr"], "wb") as f:
        os.dup2(f.fileno(), 2)
        os.dup2(f.fileno(), 1)
    if job.get("kill"):
        install_kill(job["kill"])
    if job.get("kill_after_s"):  # a moment by the clock: from a thread, so no C call delays it
        t = threading.Timer(job["kill_after_s"], os.kill, (os.getpid(), signal.SIGKILL))
        t.daemon = True
        t.start()
    sys.argv = ["swallowctl", *job["argv"]]
    from swallowctl.cli import main

    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve() -> None:
    """One JSON job per stdin line; one JSON result ({"rc": exit code or -signal}) per line."""
    for name in WARM:
        importlib.import_module(name)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(job)
        _, status = os.waitpid(pid, 0)
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"rc": rc}), flush=True)


class ForkRunner:
    """The client: starts the server, sends it commands, reads their exit code and stderr."""

    def __enter__(self) -> ForkRunner:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1",
            "COLUMNS": "400",  # log lines unwrapped
        }
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.dir = tempfile.TemporaryDirectory()
        assert json.loads(self._read())["ready"]
        return self

    def _read(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return line

    def run(
        self,
        argv: list[str],
        *,
        kill: str | None = None,
        kill_after_s: float | None = None,
        env: dict[str, str] | None = None,
    ) -> tuple[int, str]:
        """(exit code, or -9 when killed; stdout and stderr together)."""
        assert self.proc.stdin is not None
        out = Path(self.dir.name) / "out.txt"
        job = {"argv": argv, "kill": kill, "kill_after_s": kill_after_s, "env": env or {}}
        job["stderr"] = str(out)
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        rc = json.loads(self._read())["rc"]
        return rc, out.read_text(encoding="utf-8", errors="replace")

    def __exit__(self, *exc: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.dir.cleanup()


if __name__ == "__main__":
    serve()
