"""Tokens/s of `swallowctl infer`'s backends on the same model and prompts, greedy.

Three rows: our torch stream (KV-cached token loop), plain `transformers` `generate` on the same
loaded model (the overhead baseline for our loop), and our MLX stream (mlx-lm). Each figure is the
median of --repeats runs after one warm-up, counting prompt processing and generation together
(end to end, as a user waits for it); "gen tok/s" excludes the prompt, as mlx-lm reports it.

    python benchmarks/infer_speed.py                      # builtin:tiny-ja on this CPU
    python benchmarks/infer_speed.py --model swallow-8b --max-new-tokens 256 --skip-mlx  # a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

PROMPTS = [
    "こんにちは。自己紹介をしてください。",
    "日本の四季について説明してください。",
    "Explain what a KV cache is in one paragraph.",
    "おすすめの本を三冊教えてください。",
]


Runner = Callable[[], tuple[int, float]]  # one answer -> (tokens, generation-only tok/s)


def measure(runners: dict[str, Runner], repeats: int) -> dict[str, tuple[float, float, int]]:
    """Median end-to-end tok/s, median generation tok/s and tokens, per path.

    The paths take turns within every repeat, so a noisy neighbour on a shared machine slows
    all of them alike instead of whichever happened to run during the noise.
    """
    for run in runners.values():
        run()  # warm-up: first-call allocations, lazy kernels, MLX graph compilation
    e2e: dict[str, list[float]] = {name: [] for name in runners}
    gen: dict[str, list[float]] = {name: [] for name in runners}
    tokens: dict[str, int] = {}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            tokens[name], rate = run()
            e2e[name].append(tokens[name] / (time.perf_counter() - start))
            gen[name].append(rate)
    return {n: (statistics.median(e2e[n]), statistics.median(gen[n]), tokens[n]) for n in runners}


def stream_runner(
    backend: Any, prompt: list[int], settings: Any
) -> Callable[[], tuple[int, float]]:
    def run() -> tuple[int, float]:
        *_, last = backend.stream_ids(prompt, settings)  # drain the stream, keep the last
        return last.tokens, last.tokens_per_s

    return run


def generate_runner(
    backend: Any, prompt: list[int], new_tokens: int
) -> Callable[[], tuple[int, float]]:
    import torch

    ids = torch.tensor([prompt], device=backend.device)

    def run() -> tuple[int, float]:
        with torch.inference_mode():
            out = backend.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                temperature=1.0,
                top_p=1.0,
                eos_token_id=list(backend.stop_token_ids),
                pad_token_id=backend.pad_token_id,
            )
        return out.shape[1] - ids.shape[1], float("nan")

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny-ja")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-mlx", action="store_true", help="no MLX row (no mlx installed)")
    args = parser.parse_args()

    from swallowctl.core.config import SwallowConfig
    from swallowctl.infer import GenerationSettings, choose_model, open_backend

    cfg = SwallowConfig()
    settings = GenerationSettings(greedy=True, max_new_tokens=args.max_new_tokens)
    resolved, load_id = choose_model(args.model, None, cfg, backend="torch")
    torch_backend: Any = open_backend("torch", resolved, load_id, cfg)
    mlx_backend: Any = None
    if not args.skip_mlx:
        resolved_mlx, mlx_id = choose_model(args.model, None, cfg, backend="mlx")
        mlx_backend = open_backend("mlx", resolved_mlx, mlx_id, cfg)
    rows: dict[str, list[tuple[float, float, int]]] = {}
    for text in PROMPTS:
        prompt = torch_backend.prompt_ids([{"role": "user", "content": text}])
        runners = {
            "torch stream": stream_runner(torch_backend, prompt, settings),
            "torch generate": generate_runner(torch_backend, prompt, args.max_new_tokens),
        }
        if mlx_backend is not None:
            runners["mlx stream"] = stream_runner(mlx_backend, prompt, settings)
        for name, result in measure(runners, args.repeats).items():
            rows.setdefault(name, []).append(result)
    report(rows, args, torch_backend)


def report(rows: dict[str, list[tuple[float, float, int]]], args: Any, backend: Any) -> None:
    import platform

    import torch

    device = str(backend.device)
    print(f"model {args.model}, {len(PROMPTS)} prompts, greedy, <= {args.max_new_tokens} tokens, ")
    print(
        f"torch {torch.__version__} on {device} ({platform.machine()}, "
        f"{torch.get_num_threads()} threads), median of {args.repeats} after a warm-up"
    )
    print(f"{'path':<16}{'e2e tok/s':>12}{'gen tok/s':>12}{'tokens':>9}")
    means = {}
    for name, results in rows.items():
        e2e = statistics.mean(r[0] for r in results)
        gen = statistics.mean(r[1] for r in results)
        tokens = sum(r[2] for r in results)
        means[name] = e2e
        gen_text = "-" if gen != gen else f"{gen:.1f}"  # NaN: generate() reports no split
        print(f"{name:<16}{e2e:>12.1f}{gen_text:>12}{tokens:>9}")
    ratio = means["torch generate"] / means["torch stream"]
    print(f"overhead of our torch loop vs transformers generate: {ratio:.2f}x time per token")
    if "mlx stream" in means:
        print(f"mlx / torch stream speed: {means['mlx stream'] / means['torch stream']:.2f}x")


if __name__ == "__main__":
    main()
