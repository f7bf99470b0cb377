"""ppo vs grpo vs rloo on the same tiny task and sample budget: wall time, peak RSS, reward.

    .venv/bin/python benchmarks/algorithms.py                 # the quick start, a few minutes
    .venv/bin/python benchmarks/algorithms.py --updates 10 --set ppo.lr=1e-3 --json out.json

Each algorithm runs swallowctl's own trainer for it (PPOTrainer for ppo, CriticFreeTrainer, i.e.
TRL's GRPOTrainer / RLOOTrainer, for grpo and rloo) in a child process of its own, one after the
other, on the quick start (examples/quickstart.yaml: builtin:tiny-ja in fp32 on the CPU, reward
japanese_ratio, 16 samples per update, 4 passes over each, lr 3e-3, 20 updates), with the same
`--set` overrides for all three. Only `ppo.algorithm` differs, so the sample budget is equal: the
same samples per update (grpo / rloo: 16 = 4 prompts x num_generations 4; ppo: 16 prompts) and the
same number of updates.

Printed per algorithm:
- loop wall s: time.perf_counter() around `trainer.run()` inside the child. Imports, model load
  and trainer construction come before and are not counted; every rollout, reward call, update,
  the metrics/samples files and final/ are;
- loop CPU s: time.process_time() around the same call (every thread of the child): a shared
  machine slows wall time, far less the CPU time;
- peak RSS: the child's whole-life maximum resident set (ru_maxrss from os.wait4 on that child);
- reward: objective/scores (mean japanese_ratio of the update's answers) at update 1, the best
  update, and the mean of the last 5 updates.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
ALGORITHMS = ("ppo", "grpo", "rloo")
MIB = 1024 * 1024


def child(algorithm: str, overrides: list[str], report: Path, threads: int) -> None:
    """Train one algorithm and write its timings and metrics to `report` (JSON)."""
    import torch

    torch.set_num_threads(threads)
    from swallowctl.core.config import load_config

    run_dir = report.with_suffix("")
    cfg = load_config(
        QUICKSTART, [*overrides, f"ppo.algorithm={algorithm}", f"output.dir={run_dir}"]
    ).config
    if algorithm == "ppo":
        from swallowctl.ppo.trainer import PPOTrainer

        trainer: Any = PPOTrainer(cfg)
    else:
        from swallowctl.ppo.critic_free import CriticFreeTrainer

        trainer = CriticFreeTrainer(cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    result = trainer.run()
    loop_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    scores = [json.loads(x)["objective/scores"] for x in lines]
    sizes = cfg.sizes()
    report.write_text(
        json.dumps(
            {
                "loop_s": loop_s,
                "cpu_s": cpu_s,
                "updates": result.updates_done,
                "samples": sizes.total_samples,
                "samples_per_update": sizes.samples_per_update,
                "scores": scores,
                "threads": torch.get_num_threads(),
            }
        ),
        encoding="utf-8",
    )


def run_child(algorithm: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One child process; its report plus its peak RSS."""
    report = workdir / f"{algorithm}.json"
    overrides = [f"ppo.total_updates={args.updates}", *args.set]
    command = [sys.executable, __file__, "--child", algorithm, "--report", str(report)]
    command += ["--threads", str(args.threads), *(f"--set={s}" for s in overrides)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    env |= {k: str(args.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    log = open(workdir / f"{algorithm}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    log.close()
    if status != 0 or not report.is_file():
        tail = (workdir / f"{algorithm}.log").read_text(errors="replace")[-2000:]
        return {"error": f"exit status {status}:\n{tail}"}
    out: dict[str, Any] = json.loads(report.read_text(encoding="utf-8"))
    out["peak_rss"] = usage.ru_maxrss * 1024  # KiB on Linux
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    head = (
        f"{'algorithm':<10}{'loop wall s':>12}{'loop CPU s':>12}{'peak RSS MiB':>14}"
        f"{'reward @1':>11}{'best':>8}{'last 5':>8}"
    )
    rows = [head, "-" * len(head)]
    for name, r in results.items():
        if "error" in r:
            rows.append(f"{name:<10}failed: {r['error'].splitlines()[0]}")
            continue
        s = r["scores"]
        rows.append(
            f"{name:<10}{r['loop_s']:>12.1f}{r['cpu_s']:>12.1f}{r['peak_rss'] / MIB:>14.0f}"
            f"{s[0]:>11.3f}{max(s):>8.3f}{sum(s[-5:]) / len(s[-5:]):>8.3f}"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per child")
    parser.add_argument("--set", action="append", default=[], help="config override, all three")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", type=Path, help="keep runs and logs in this folder")
    parser.add_argument("--child", choices=ALGORITHMS, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.set, args.report, args.threads)
        return
    with tempfile.TemporaryDirectory(prefix="swallowctl-algos-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        results = {}
        for algorithm in args.algorithms:
            print(f"running {algorithm} ...", file=sys.stderr, flush=True)
            results[algorithm] = run_child(algorithm, args, workdir)
    first = next((r for r in results.values() if "samples" in r), None)
    if first:
        print(
            f"quick start, {args.updates} updates x {first['samples_per_update']} samples "
            f"= {first['samples']} samples each, {args.threads} torch threads, overrides: "
            f"{args.set or 'none'}"
        )
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
