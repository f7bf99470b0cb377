"""`builtin:tiny-ja`: a deterministic tiny Llama and reward model for tests, quickstart, benches.

Nothing here touches the network. The tokenizer is a byte-level BPE trained at build time on the
bundled `data/tiny_corpus.txt` (Japanese and some English) with Llama-3.1's special tokens, stop
ids and chat-template structure; the weights are random from a fixed seed. Every file is written by
hand (sorted-key JSON, sorted safetensors), so a build gives the same bytes on every run.

The cache lives at `$SWALLOWCTL_CACHE` (else `~/.cache/swallowctl`) under
`tiny-ja-<hash of corpus, build parameters and BUILD_VERSION>/{policy,reward}`; any change to
those inputs gives a new directory instead of silently reusing a stale build.

torch, tokenizers and safetensors are imported inside functions only: `import swallowctl` must
stay light for the CLI and for machines without the `train` extra.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from swallowctl.core.errors import MissingDependencyError, RuntimeFailure

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

TINY_ID = "builtin:tiny-ja"
TINY_REWARD_ID = "builtin:tiny-ja-reward"

# Bump whenever the build code changes what it writes: it is part of the cache key.
BUILD_VERSION = 2

Kind = Literal["policy", "reward"]
KINDS: tuple[Kind, ...] = ("policy", "reward")

# Llama-3.1's named special tokens in Llama-3.1's order (ids 128000..128010 there). Here they sit
# right after the learned vocab, so `<|begin_of_text|>` is the first id past the BPE merges.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|eot_id|>"  # as in Llama-3.1-Instruct's tokenizer_config
PAD_TOKEN = "<|finetune_right_pad_id|>"  # never an EOS: padding must not look like a stop
STOP_TOKENS: tuple[str, ...] = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")

VOCAB_SIZE = 2048  # learned BPE vocab + the 11 specials; a multiple of 64 (see _train_tokenizer)
VOCAB_MULTIPLE = 64
MODEL_MAX_LENGTH = 2048
SEED = 20240723  # Llama-3.1's release date; any fixed value works
INIT_STD = 0.02
# The LM head is drawn wider. With 0.02 every next-token distribution is near uniform and the
# logit gap LoRA can open is bounded by |h| x |w_row| (about 0.2 nats here), so no RL test could
# show learning. At 0.2 the random model is peaked (about 2.3 nats of entropy per token) and
# steerable: PPO on a simple reward visibly learns within a minute on CPU.
LM_HEAD_STD = 0.2

# Every weight dimension is a multiple of 64 (hidden 128, kv width 2*32=64, intermediate 384,
# vocab 2048), so mlx-lm and bitsandbytes can quantize every Linear with group/block size 64.
MODEL_PARAMS: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": MODEL_MAX_LENGTH,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    # Llama-3.1's "llama3" RoPE scaling, shrunk so original * factor = max_position_embeddings.
    # With head_dim 32 it leaves some frequencies alone, smooths some and scales the rest, so
    # torch-vs-MLX agreement tests cover all three branches of the real model's RoPE.
    "rope_scaling": {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": MODEL_MAX_LENGTH // 8,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": False,  # like Llama-3.1-8B
}

# Llama-3's pre-tokenizer split (public in every Llama-3 tokenizer.json): letters, up to three
# digits at a time, punctuation runs, whitespace. Japanese has no spaces, so runs of kana/kanji
# stay one pre-token and BPE learns the sub-words.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama-3.1-Instruct's turn structure: BOS, then per message
# `<|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT<|eot_id|>` (content trimmed, as Meta's
# template does), then the assistant header when add_generation_prompt is set.
# Deliberately NOT mirrored: Meta's template always injects a system turn starting
# "Cutting Knowledge Date: December 2023\nToday Date: <today>\n\n". Swallow-Instruct's published
# template (our real target) has no such preamble, and "today" would make prompts, token counts
# and test expectations change from day to day. Tools/ipython turns are out of scope here.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

_CORPUS_RESOURCE = "data/tiny_corpus.txt"
_COMPLETE_MARKER = ".swallowctl-complete"  # written last; its presence means "fully built"


def corpus_bytes() -> bytes:
    """Return the bundled training text for the tiny tokenizer (package data)."""
    return resources.files("swallowctl.core").joinpath(_CORPUS_RESOURCE).read_bytes()


def build_hash() -> str:
    """Short hash of everything that decides the build's bytes: corpus, parameters, version."""
    params = {
        "build_version": BUILD_VERSION,
        "chat_template": CHAT_TEMPLATE,
        "init_std": INIT_STD,
        "lm_head_std": LM_HEAD_STD,
        "model": MODEL_PARAMS,
        "model_max_length": MODEL_MAX_LENGTH,
        "pretokenize_regex": PRETOKENIZE_REGEX,
        "seed": SEED,
        "special_tokens": SPECIAL_TOKENS,
        "tokens": [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *STOP_TOKENS],
        "vocab_size": VOCAB_SIZE,
    }
    digest = hashlib.sha256(corpus_bytes())
    digest.update(b"\0")
    digest.update(json.dumps(params, sort_keys=True).encode())
    return digest.hexdigest()[:12]


def cache_root() -> Path:
    """Where built-in models are cached: `$SWALLOWCTL_CACHE`, else `~/.cache/swallowctl`."""
    env = os.environ.get("SWALLOWCTL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "swallowctl"


def builtin_path(model_id: str) -> Path:
    """Map `builtin:tiny-ja` / `builtin:tiny-ja-reward` to their cached build directory."""
    kinds: dict[str, Kind] = {TINY_ID: "policy", TINY_REWARD_ID: "reward"}
    if model_id not in kinds:
        raise RuntimeFailure(
            f"unknown built-in model '{model_id}'",
            hint=f"the built-in models are {TINY_ID} and {TINY_REWARD_ID}",
        )
    return tiny_path(kinds[model_id])


def tiny_path(kind: Kind = "policy") -> Path:
    """Return the cached tiny model directory of `kind`, building it first if absent.

    Safe under concurrency (pytest-xdist, several accelerate processes): each process builds into
    its own temporary directory beside the target and renames it into place; a process that loses
    the race discards its copy and uses the winner's.
    """
    _check_kind(kind)
    final = cache_root() / f"tiny-ja-{build_hash()}" / kind
    if _is_complete(final):
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind}.tmp-", dir=final.parent))
    except OSError as e:
        raise RuntimeFailure(
            f"cannot create the model cache at {final.parent}: {e.strerror or e}",
            hint="set SWALLOWCTL_CACHE to a writable directory",
        ) from e
    try:
        build_tiny(tmp, kind)
        (tmp / _COMPLETE_MARKER).write_bytes(f"{TINY_ID} {build_hash()} {kind}\n".encode())
        _publish(tmp, final)
    except OSError as e:
        raise RuntimeFailure(f"cannot write the tiny model into {final.parent}: {e}") from e
    finally:
        # After a successful rename tmp no longer exists; otherwise drop our partial/losing copy.
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_tiny(out_dir: Path, kind: Kind = "policy") -> Path:
    """Write a complete Hugging Face model directory for the tiny model into `out_dir`.

    `kind="policy"` writes a `LlamaForCausalLM` (with generation_config.json); `kind="reward"` a
    `LlamaForSequenceClassification` with one label. Both share the tokenizer and the backbone
    weights. The output is byte-identical across builds. Returns `out_dir`.
    """
    _check_kind(kind)
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer()
    ids: dict[str, int] = {}
    for tok in SPECIAL_TOKENS:
        tid = tokenizer.token_to_id(tok)
        if tid is None:  # the trainer was given them as special tokens; absent means a bug
            raise RuntimeFailure(f"tiny tokenizer lost special token {tok}")
        ids[tok] = tid
    _write_bytes(out_dir / "tokenizer.json", (tokenizer.to_str(pretty=True) + "\n").encode())
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config())
    _write_json(
        out_dir / "special_tokens_map.json",
        {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN},
    )

    config = _model_config(kind, ids)
    _write_json(out_dir / "config.json", config)
    if kind == "policy":
        _write_json(out_dir / "generation_config.json", _generation_config(ids))
    _write_weights(out_dir / "model.safetensors", config, kind)

    log.info("built %s (%s) in %.2fs at %s", TINY_ID, kind, time.perf_counter() - start, out_dir)
    return out_dir


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")


def _is_complete(path: Path) -> bool:
    return (path / _COMPLETE_MARKER).is_file()


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move the finished build `tmp` to `final`, tolerating a concurrent winner."""
    try:
        os.rename(tmp, final)
        return
    except OSError:
        # On POSIX rename fails onto a non-empty directory (ENOTEMPTY/EEXIST), on Windows onto
        # any existing one: someone else got there first, or something left a broken directory.
        if _is_complete(final):
            log.debug("another process built %s first; using its copy", final)
            return
    # `final` exists without the marker: not ours (we only ever rename complete builds), e.g. a
    # hand-edited or partly deleted cache. Move it aside and retry once.
    log.warning("replacing incomplete tiny model directory %s", final)
    stale = final.with_name(f".{final.name}.stale-{uuid.uuid4().hex[:8]}")
    with contextlib.suppress(FileNotFoundError):  # someone else moved it meanwhile
        os.rename(final, stale)
    try:
        os.rename(tmp, final)
    except OSError:
        if not _is_complete(final):
            raise
    finally:
        shutil.rmtree(stale, ignore_errors=True)


def _require(module: str, package: str) -> None:
    try:
        __import__(module)
    except ImportError as e:
        raise MissingDependencyError(package, "train", f"building {TINY_ID}") from e


def _train_tokenizer() -> Tokenizer:
    """Train the byte-level BPE on the bundled corpus and add Llama-3.1's special tokens."""
    _require("tokenizers", "tokenizers")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    # ignore_merges / no prefix space / Split+ByteLevel(use_regex=False): as Llama-3's tokenizer.
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    learned = VOCAB_SIZE - len(SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=learned,
        # The corpus is small: merging pairs seen once is what lets it reach the target size.
        min_frequency=0,
        show_progress=False,
        # All 256 byte symbols, so any string (emoji, rare kanji) encodes and decodes losslessly.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    lines = corpus_bytes().decode("utf-8").splitlines(keepends=True)
    tokenizer.train_from_iterator(lines, trainer=trainer, length=len(lines))
    got = tokenizer.get_vocab_size()
    if got != learned:
        # The trainer stops early when the corpus runs out of pairs; the vocab size (and so the
        # multiple-of-64 rule) would then silently change. Fail loudly instead.
        raise RuntimeFailure(f"tiny tokenizer learned {got} tokens, expected {learned}")

    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    expected_ids = list(range(learned, learned + len(SPECIAL_TOKENS)))
    if [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] != expected_ids:
        raise RuntimeFailure("tiny tokenizer special tokens did not land right after the vocab")
    if tokenizer.get_vocab_size() % VOCAB_MULTIPLE:
        raise RuntimeFailure(f"tiny vocab size is not a multiple of {VOCAB_MULTIPLE}")
    return tokenizer


def _tokenizer_config() -> dict[str, Any]:
    return {
        "bos_token": BOS_TOKEN,
        "chat_template": CHAT_TEMPLATE,
        # Llama-3.1 sets this true, but then decode() rewrites " ." to "." and " 's" to "'s";
        # false keeps encode->decode lossless, which the tests and reward text rely on.
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def _model_config(kind: Kind, ids: dict[str, int]) -> dict[str, Any]:
    config: dict[str, Any] = {
        **MODEL_PARAMS,
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids[BOS_TOKEN],
        "eos_token_id": [ids[t] for t in STOP_TOKENS],
        "hidden_act": "silu",
        "initializer_range": INIT_STD,
        "mlp_bias": False,
        "model_type": "llama",
        "pad_token_id": ids[PAD_TOKEN],
        "pretraining_tp": 1,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
    }
    if kind == "reward":
        # num_labels=1 is spelled as transformers saves it; pad_token_id (set above) is what
        # LlamaForSequenceClassification uses to find each row's last real token.
        config["architectures"] = ["LlamaForSequenceClassification"]
        config["id2label"] = {"0": "LABEL_0"}
        config["label2id"] = {"LABEL_0": 0}
    return config


def _generation_config(ids: dict[str, int]) -> dict[str, Any]:
    return {
        "bos_token_id": ids[BOS_TOKEN],
        "do_sample": True,
        "eos_token_id": [ids[t] for t in STOP_TOKENS],  # all Llama-3.1 stop ids
        "pad_token_id": ids[PAD_TOKEN],
        "temperature": 0.7,
        "top_p": 0.9,
    }


def _weight_shapes(config: dict[str, Any], kind: Kind) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes exactly as transformers' Llama classes name them."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q_width = config["num_attention_heads"] * config["head_dim"]
    kv_width = config["num_key_value_heads"] * config["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (hidden,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (hidden,)
        shapes[f"{p}.self_attn.q_proj.weight"] = (q_width, hidden)
        shapes[f"{p}.self_attn.k_proj.weight"] = (kv_width, hidden)
        shapes[f"{p}.self_attn.v_proj.weight"] = (kv_width, hidden)
        shapes[f"{p}.self_attn.o_proj.weight"] = (hidden, q_width)
        shapes[f"{p}.mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.down_proj.weight"] = (hidden, inter)
    if kind == "policy":
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    else:
        shapes["score.weight"] = (len(config["id2label"]), hidden)  # one reward per sequence
    return shapes


def _random_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.float32)  # RMSNorm starts as identity
    # One generator per tensor, seeded from (SEED, name): a tensor does not depend on which others
    # exist, so policy and reward share the backbone bit for bit. Drawn in float64 because
    # torch's float32 CPU normal_ has an AVX2-only path; float64 uses one code path everywhere,
    # and rounding to float32 afterwards hides last-ulp libm differences between platforms.
    seed = int.from_bytes(hashlib.sha256(f"{SEED}:{name}".encode()).digest()[:8], "little")
    gen = torch.Generator(device="cpu").manual_seed(seed & (2**63 - 1))
    std = LM_HEAD_STD if name == "lm_head.weight" else INIT_STD
    values = torch.randn(shape, generator=gen, dtype=torch.float64) * std
    return values.to(torch.float32)


def _write_weights(path: Path, config: dict[str, Any], kind: Kind) -> None:
    _require("torch", "torch")
    _require("safetensors", "safetensors")
    from safetensors.torch import save_file

    shapes = _weight_shapes(config, kind)
    tensors = {name: _random_tensor(name, shapes[name]) for name in sorted(shapes)}
    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_json(path: Path, obj: Any) -> None:
    _write_bytes(
        path, (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()
    )


def _write_bytes(path: Path, data: bytes) -> None:
    # Bytes, not text mode: no platform newline translation may change the output.
    path.write_bytes(data)
