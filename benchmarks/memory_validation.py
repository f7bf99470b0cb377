"""Check tune-memory's estimate against what a real GPU allocates, phase by phase.

    python benchmarks/memory_validation.py            # the default matrix on Llama-3.1-8B's shape
    python benchmarks/memory_validation.py --full     # micro-batch x response x r x checkpointing
    python benchmarks/memory_validation.py --cpu-smoke  # the script itself, tiny model, on CPU

The model is Llama-3.1-8B's architecture (Swallow-8B's) with random weights, built straight into
4-bit NF4 (double quant) one Linear at a time: nothing is downloaded and no bf16 copy of the whole
model ever exists. Adapters, value head, prepare_model_for_kbit_training and the log-prob path
are the trainer's own (swallowctl.ppo.policy). Each phase runs as the trainer runs it:

- rollout: `generate` with the adapter on, KV cache, top-p sampling, forced to max_new_tokens;
- scoring: no-grad policy + values and reference forwards over prompt + response;
- update: forward with grad, loss, backward, AdamW step (after a warm-up step, so the optimizer
  states exist as they do from the second update on).

For each phase, torch.cuda.max_memory_allocated is compared with the estimate's tensors (its
phase total less CUDA context and allocator slack, which the allocator's counter does not see),
and max_memory_reserved with the estimate less the context. Exit 0 after printing the table and
the worst error; exit 1 without CUDA.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass
from typing import Any

GIB = 1024**3
PROMPT_TOKENS = 512
SWALLOW = "swallow-8b"


@dataclass(frozen=True)
class Case:
    micro_batch: int
    response_tokens: int
    lora_r: int
    gradient_checkpointing: bool

    @property
    def name(self) -> str:
        gc = "gc" if self.gradient_checkpointing else "no-gc"
        return f"mb{self.micro_batch} R{self.response_tokens} r{self.lora_r} {gc}"


def matrix(full: bool) -> list[Case]:
    """The cases: the full product, or one axis at a time around micro-batch 2, 512 tokens,
    r 16, checkpointing on (enough to see every term move)."""
    if full:
        return [
            Case(*c)
            for c in itertools.product(
                (1, 2, 4, 8), (128, 256, 512, 1024), (8, 16, 32, 64), (True, False)
            )
        ]
    base = Case(2, 512, 16, True)
    cases = [base]
    cases += [Case(m, 512, 16, True) for m in (1, 4, 8)]
    cases += [Case(2, n, 16, True) for n in (128, 256, 1024)]
    cases += [Case(2, 512, r, True) for r in (8, 32, 64)]
    cases += [Case(m, 512, 16, False) for m in (1, 2, 4)]
    return cases


def case_config(case: Case, model: str) -> Any:
    """The SwallowConfig a user would write for this case (everything else at the defaults)."""
    from swallowctl.core.config import load_config

    sets = [
        f"model.name_or_path={model}",
        f"ppo.per_device_train_batch_size={case.micro_batch}",
        "ppo.grad_accum_steps=1",
        f"generation.max_new_tokens={case.response_tokens}",
        f"data.max_prompt_tokens={PROMPT_TOKENS}",
        f"lora.r={case.lora_r}",
        f"ppo.gradient_checkpointing={str(case.gradient_checkpointing).lower()}",
    ]
    return load_config(None, sets).config


# ---- the model ----------------------------------------------------------------------------


def build_4bit_model(arch: Any, device: str) -> Any:
    """A LlamaForCausalLM of `arch`'s shape with random weights, its decoder Linears in NF4."""
    import bitsandbytes as bnb
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        head_dim=arch.head_dim,
        vocab_size=arch.vocab_size,
        tie_word_embeddings=arch.tie_word_embeddings,
        max_position_embeddings=max(arch.max_position_embeddings, 4096),
    )
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, _nf4_linear(bnb, torch, child, device))
    bf16 = torch.bfloat16
    emb = model.model.embed_tokens
    emb.weight = torch.nn.Parameter(_random(torch, emb.weight.shape, device), requires_grad=False)
    if not arch.tie_word_embeddings:
        shape = model.lm_head.weight.shape
        model.lm_head.weight = torch.nn.Parameter(_random(torch, shape, device), False)
    for name, module in model.named_modules():
        if name.endswith("norm"):
            module.weight = torch.nn.Parameter(
                torch.ones(arch.hidden_size, dtype=bf16, device=device)
            )
    with torch.device(device):  # inv_freq was computed on meta
        model.model.rotary_emb = LlamaRotaryEmbedding(config)
    # What transformers sets on a bitsandbytes-loaded model, read by peft.
    setattr(model, "is_loaded_in_4bit", True)  # noqa: B010 (an attribute torch does not type)
    model.config.use_cache = False
    return model


def _random(torch: Any, shape: Any, device: str) -> Any:
    return torch.randn(*shape, dtype=torch.bfloat16, device=device) * 0.02


def _nf4_linear(bnb: Any, torch: Any, linear: Any, device: str) -> Any:
    out = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=False,
        compute_dtype=torch.bfloat16,
        compress_statistics=True,
        quant_type="nf4",
        device="meta",
    )
    weight = _random(torch, (linear.out_features, linear.in_features), device)
    out.weight = bnb.nn.Params4bit(
        weight.cpu() if device == "cpu" else weight,
        requires_grad=False,
        compress_statistics=True,
        quant_type="nf4",
    ).to(device)  # quantizes here: only this one bf16 weight exists at a time
    return out


# ---- the phases ---------------------------------------------------------------------------


def run_rollout(peft: Any, cfg: Any, device: str) -> None:
    """generate() as swallowctl/ppo/rollout.py calls it, forced to the full response length."""
    import torch

    g, batch = cfg.generation, cfg.ppo.per_device_train_batch_size
    peft.eval()  # as the trainer's rollout: dropout off
    query = torch.randint(10, 1000, (batch, cfg.data.max_prompt_tokens), device=device)
    with torch.no_grad():
        peft.generate(
            input_ids=query,
            attention_mask=torch.ones_like(query),
            do_sample=True,
            temperature=g.temperature,
            top_p=g.top_p,
            max_new_tokens=g.max_new_tokens,
            min_new_tokens=g.max_new_tokens,
            pad_token_id=0,
            use_cache=True,
        )


def _sequences(cfg: Any, device: str) -> tuple[Any, Any]:
    import torch

    batch = cfg.ppo.per_device_train_batch_size
    length = cfg.data.max_prompt_tokens + cfg.generation.max_new_tokens
    ids = torch.randint(10, 1000, (batch, length), device=device)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding, as rollouts have: SDPA then takes a mask
    return ids, mask


def run_scoring(module: Any, cfg: Any, device: str) -> None:
    """The trainer's `_score_forward`: policy + values, then the reference, no grad."""
    import torch

    from swallowctl.ppo.policy import reference_mode

    module.eval()
    ids, mask = _sequences(cfg, device)
    args = (ids, mask, cfg.data.max_prompt_tokens, cfg.generation.temperature)
    rest = (cfg.generation.top_p, cfg.ppo.logits_chunk_size)
    with torch.no_grad():
        module(*args, *rest, with_values=True)
        with reference_mode(module.peft):
            module(*args, *rest, with_values=False)


def run_update(module: Any, optimizer: Any, cfg: Any, device: str) -> None:
    """One micro-batch: forward with grad, a PPO-shaped loss, backward, AdamW step."""
    module.train()  # as the trainer's _epochs: dropout on, checkpointing active
    ids, mask = _sequences(cfg, device)
    g = cfg.generation
    lp, values, ent = module(
        ids, mask, cfg.data.max_prompt_tokens, g.temperature, g.top_p, cfg.ppo.logits_chunk_size
    )
    # Random targets fall outside the top-p nucleus (log-prob -inf), and algo's entropy of
    # top-p-filtered logits is NaN (0 * -inf): the memory is what is measured here, so the loss
    # is made finite and non-finite grads are zeroed before the step keeps the weights finite.
    loss = -lp.clamp(min=-100).mean() + 0.1 * values.pow(2).mean() - 0.01 * ent.mean()
    loss.backward()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad.nan_to_num_(0.0, 0.0, 0.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ---- measuring ----------------------------------------------------------------------------


def measure(fn: Any, device: str) -> tuple[int, int]:
    """(max allocated, max reserved) bytes while fn runs; (0, 0) off CUDA."""
    import torch

    if not device.startswith("cuda"):
        fn()
        return 0, 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def expected(est: Any, phases: tuple[str, ...]) -> tuple[int, int]:
    """The estimate as the allocator sees it: (tensors, tensors + slack) of the largest phase."""
    phase = max((est.phase(p) for p in phases), key=lambda p: p.total)
    context = phase.bytes_of("cuda_context")
    slack = phase.bytes_of("allocator_slack")
    return phase.total - context - slack, phase.total - context


def run_case(base: Any, arch: Any, case: Case, model: str, device: str) -> list[tuple[Any, ...]]:
    """All phases of one case; rows of (case, phase, estimate, measured, reserved est, reserved)."""
    import torch

    from swallowctl.memory import estimate, settings_from_config
    from swallowctl.ppo import policy

    cfg = case_config(case, model)
    precision = policy.decide_precision(cfg, device)
    peft = policy.attach_adapters(base, cfg, precision)
    if not case.gradient_checkpointing:
        backbone: Any = peft.base_model.model
        # transformers 5 renamed it; older releases only have the first name.
        off = getattr(backbone, "activation_checkpointing_disable", None)
        (off or backbone.gradient_checkpointing_disable)()
    module = policy.build_policy_value(peft, arch.hidden_size).to(device)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, eps=1e-5)
    run_update(module, optimizer, cfg, device)  # warm-up: AdamW states exist from here on
    est = estimate(arch, settings_from_config(cfg))
    rows = []
    for phase, fn, names in (
        ("rollout", lambda: run_rollout(peft, cfg, device), ("rollout",)),
        ("scoring", lambda: run_scoring(module, cfg, device), ("scoring",)),
        (
            "update",
            lambda: run_update(module, optimizer, cfg, device),
            ("update:loss", "update:backward"),
        ),
    ):
        peak, reserved = measure(fn, device)
        tensors, with_slack = expected(est, names)
        rows.append((case.name, phase, tensors, peak, with_slack, reserved))
    peft.unload()  # the base without adapters, for the next case
    return rows


def report(rows: list[tuple[Any, ...]], measured: bool = True) -> float:
    """Print the table; return the worst relative error of allocated memory."""
    head = ("case", "phase", "est GiB", "meas GiB", "err", "est+slack", "reserved")
    print("{:24} {:8} {:>8} {:>8} {:>7}  {:>9} {:>8}".format(*head))
    worst = 0.0
    for name, phase, est, got, est_res, res in rows:
        err = (est - got) / got if got else 0.0
        worst = max(worst, abs(err))
        print(
            f"{name:24} {phase:8} {est / GIB:8.2f} {got / GIB:8.2f} {err:+7.1%}  "
            f"{est_res / GIB:9.2f} {res / GIB:8.2f}"
        )
    if measured:
        print(f"worst error (allocated): {worst:.1%}  (+ = the estimate is above the measurement)")
    else:
        print("cpu smoke: every phase ran; nothing was measured (no CUDA)")
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the whole product of the axes")
    parser.add_argument("--model", default=SWALLOW, help="registry name whose shape to build")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="run every phase once on a tiny model on CPU, measuring nothing (checks the script)",
    )
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("memory_validation needs torch (pip install 'swallowctl[train]')", file=sys.stderr)
        return 1
    from swallowctl.core.models import Architecture, resolve

    if args.cpu_smoke:
        arch = Architecture(128, 2, 4, 2, 32, 384, 2048, False, 2048, "llama")
        cases, device, model = [Case(2, 8, 8, True), Case(1, 8, 8, False)], "cpu", "builtin:tiny-ja"
        torch.set_num_threads(1)  # a tiny model: threads only fight over a busy CPU
    elif not torch.cuda.is_available():
        print(
            "memory_validation measures GPU memory and needs a CUDA GPU; none is visible here "
            "(torch.cuda.is_available() is False). Run it on a machine with one, or pass "
            "--cpu-smoke to check the script itself.",
            file=sys.stderr,
        )
        return 1
    else:
        arch, cases, device, model = (
            resolve(args.model).architecture,
            matrix(args.full),
            "cuda",
            args.model,
        )
    start = time.perf_counter()
    base = build_4bit_model(arch, device)
    seconds = time.perf_counter() - start
    print(f"built {'a tiny model' if args.cpu_smoke else args.model} in 4-bit in {seconds:.0f} s")
    rows: list[tuple[Any, ...]] = []
    for case in cases:
        rows += run_case(base, arch, case, model, device)
    report(rows, measured=device == "cuda")
    return 0


if __name__ == "__main__":
    sys.exit(main())
