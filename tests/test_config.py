"""The config loader: the seed's and our users' files load with their meaning; errors say where."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from swallowctl.core.config import (
    DEFAULT_MODEL,
    NO_LONGER_NEEDED,
    RELOCATED,
    STARTER,
    BatchSizes,
    PPOSection,
    SwallowConfig,
    config_keys,
    dump_config,
    load_config,
    parse_override,
)
from swallowctl.core.errors import ConfigError, UsageError

FIXTURES = Path(__file__).parent / "fixtures"

# ORIGIN.md's list of the `ppo:` keys our users write.
ORIGIN_PPO_KEYS = [
    "model_name_or_path",
    "revision",
    "lora_rank",
    "lr",
    "lr_scheduler_type",
    "warmup_ratio",
    "max_grad_norm",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "grad_accum_steps",
    "num_mini_batches",
    "ppo_epochs",
    "local_rollout_forward_batch_size",
    "total_updates",
    "gradient_checkpointing",
    "max_new_tokens",
    "temperature",
    "top_p",
    "decode_typical_p",
    "kl_coef",
    "kl_estimator",
    "target_kl",
    "min_kl_coef",
    "max_kl_coef",
    "kl_adjust_up",
    "kl_adjust_down",
    "cliprange",
    "cliprange_value",
    "vf_coef",
    "gamma",
    "lam",
    "whiten_rewards",
    "entropy_coef",
    "entropy_auto_adjust",
    "entropy_target",
    "entropy_adjust_beta",
    "entropy_coef_initial",
    "entropy_coef_min",
    "entropy_coef_max",
    "max_entropy_bonus",
    "entropy_floor",
    "entropy_patience",
    "entropy_monitor_warmup",
    "enable_deterministic_eval",
    "deterministic_eval_frequency",
    "max_memory_per_device_gib",
    "cuda_visible_devices",
    "device_map_strategy",
    "ref_device",
    "output_dir",
]


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def error_of(path: Path | None, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return e.value.message


def test_seed_config_loads_with_the_seeds_meaning() -> None:
    loaded = load_config(FIXTURES / "seed_config.yaml")
    cfg = loaded.config
    assert loaded.warnings == []
    assert cfg.model.name_or_path == "tokyotech-llm/Llama-3.1-Swallow-8B-Instruct-v0.5"
    assert (cfg.generation.temperature, cfg.generation.top_p) == (0.7, 0.9)
    assert cfg.generation.max_new_tokens == 512
    assert cfg.ppo.per_device_train_batch_size == 4
    assert cfg.ppo.grad_accum_steps == 8
    assert cfg.model.max_memory_per_device_gib == 40
    # The seed's advice keeps the effective batch: 4 x 8 == 8 x 4.
    assert cfg.sizes().mini_batch == 32


def test_defaults_are_the_seeds_settings() -> None:
    cfg = load_config(None).config
    assert cfg.model.name_or_path == DEFAULT_MODEL
    assert (cfg.generation.temperature, cfg.generation.top_p) == (0.7, 0.9)
    assert cfg.generation.max_new_tokens == 512
    assert cfg.model.trust_remote_code is False


def test_every_origin_ppo_key_is_implemented_or_warned() -> None:
    text = (FIXTURES / "origin_config.yaml").read_text(encoding="utf-8")
    written = set(yaml.safe_load(text)["ppo"])
    assert set(ORIGIN_PPO_KEYS) <= written, "fixture must carry every ORIGIN.md key"
    for key in ORIGIN_PPO_KEYS:
        assert key in PPOSection.model_fields or key in RELOCATED or key in NO_LONGER_NEEDED, key

    loaded = load_config(FIXTURES / "origin_config.yaml")
    cfg = loaded.config
    warned = {k for k in NO_LONGER_NEEDED if any(f"ppo.{k} " in w for w in loaded.warnings)}
    assert warned == {"cuda_visible_devices", "device_map_strategy", "ref_device"}
    # Each warning is one line naming file and line, and why the key is moot.
    lines = text.splitlines()
    for w in loaded.warnings:
        assert "\n" not in w
        where, key = w.split(": ")[0], w.split(": ")[1].split()[0]
        file, line = where.rsplit(":", 1)
        assert file.endswith("origin_config.yaml")
        assert lines[int(line) - 1].strip().startswith(key.removeprefix("ppo.") + ":")
    assert any("adapter turned off" in w for w in loaded.warnings)
    # Relocated keys mean the same thing in their new home.
    assert cfg.lora.r == 16
    assert cfg.generation.max_new_tokens == 2
    assert cfg.generation.typical_p == 0.9
    assert cfg.model.max_memory_per_device_gib == 44
    assert cfg.output.dir == "../models/ppo_robot"
    assert cfg.ppo.kl_estimator == "k3" and cfg.ppo.target_kl == 0.05
    assert cfg.ppo.entropy_transition_updates == [0.1, 0.3]
    # Sections we do not own reach the user's code untouched.
    assert cfg.user_sections["env"]["personas"]["A"]["triggers"] == ["お金", "仕事"]
    assert set(cfg.user_sections) == {"env", "scorer", "topic_manager", "ollama", "llm", "wandb"}
    # "effective batch = per_device x GA x 2" finally has a name: samples per update.
    s = cfg.sizes()
    assert (s.mini_batch, s.samples_per_update, s.total_updates) == (32, 64, 50)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ppo:\n  lr: 1.0e-5\n  lerning_rate: 2\n", ":3: ppo.lerning_rate: unknown key"),
        ("ppo:\n  lr: 1.0e-5\n  lerning_rate: 2\n", "did you mean 'lr'?"),
        ("ppo:\n  gradient_accumulation_steps: 2\n", "did you mean 'grad_accum_steps'?"),
        ("lora:\n  alpah: 8\n", ":2: lora.alpah: unknown key 'alpah'; did you mean 'alpha'?"),
        ("ppo:\n  lr: fast\n", ":2: ppo.lr: Input should be a valid number (got 'fast')"),
        ("ppo:\n  per_device_train_batch_size: 0\n", "greater than 0 (got 0)"),
        ("ppo:\n  ppo_epochs: -3\n", ":2: ppo.ppo_epochs: "),
        ("generation:\n  top_p: 1.5\n", ":2: generation.top_p: Input should be less than"),
        ("ppo:\n  kl_estimator: k2\n", "ppo.kl_estimator: Input should be 'k1' or 'k3'"),
        ("quantization:\n  load_in_4bit: maybe\n", "a valid boolean or 'auto' (got 'maybe')"),
        ("ppo:\n  temperature: 0\n", ":2: ppo.temperature: Input should be greater than 0"),
        ("rewards:\n  - weight: 2\n", ":2: rewards.0: a reward needs exactly one of"),
        ("rewards:\n  - function: a\n    url: http://x\n", "(got function, url)"),
        ("ppp:\n  lr: 1\n", ":1: ppp: unknown section; did you mean 'ppo'?"),
        ("ppo: 3\n", ":1: ppo: Input should be a valid dictionary (got 3)"),
        ("data:\n  mode: chatt\n", ":2: data.mode: unknown mode 'chatt'; did you mean 'chat'?"),
        (
            "ppo:\n  entropy_auto_adjust: true\n",
            "ppo.entropy_auto_adjust: needs ppo.entropy_target",
        ),
        ("ppo:\n  total_updates: 3\n  total_episodes: 9\n", ":3: ppo.total_episodes: give"),
        ("ppo:\n  min_kl_coef: 2\n  max_kl_coef: 1\n", "is larger than ppo.max_kl_coef"),
        ("ppo:\n  entropy_transition_updates: [0.5, 0.2]\n", "must be increasing shares"),
        ("ppo:\n  lr: 1\n  lr: 2\n", ":3: ppo.lr: duplicate key (first at line 2)"),
        ("ppo:\n  temperature: 0.3\ngeneration:\n  temperature: 0.9\n", "contradicts"),
        ("ppo:\n  lr: [1,\n", ": YAML syntax error:"),
        ("- a\n- b\n", ":1: the top level must be a mapping"),
        ("modes:\n  mine:\n    sytem: hi\n", "modes.mine.sytem: unknown key 'sytem'; did you mean"),
    ],
)
def test_broken_configs_name_file_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    message = error_of(path)
    assert expected in message
    assert message.startswith(str(path))


def test_several_errors_one_line_each_in_file_order(tmp_path: Path) -> None:
    path = write(tmp_path, "generation:\n  top_p: 7\nppo:\n  lr: x\n  vf_coef: -1\n")
    lines = error_of(path).splitlines()
    assert [ln.split(": ")[0] for ln in lines] == [f"{path}:2", f"{path}:4", f"{path}:5"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "the config file is empty"),
        (b"\x00\x01binary\xff", "not UTF-8 text"),
        (b"ppo:\n  lr: \x07\n", ":2: not a text file"),
    ],
)
def test_unreadable_files(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    assert expected in error_of(path)


def test_missing_file_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "nope.yaml")
    assert "no such config file" in e.value.message
    assert "swallowctl config init" in (e.value.hint or "")


def test_overrides_win_and_speak_the_dialect(tmp_path: Path) -> None:
    path = FIXTURES / "seed_config.yaml"
    cfg = load_config(
        path,
        (
            "ppo.temperature=0.3",  # the dialect name reaches generation.temperature
            "ppo.lr=1e-5",  # YAML 1.1 reads this as a string; we mean the number
            "rewards.0.function=japanese_ratio",
            "rewards.0.weight=2",
            "lora.target_modules=[q_proj, v_proj]",
            "env.max_steps=8",  # a user section can be set too
        ),
    ).config
    assert cfg.generation.temperature == 0.3
    assert cfg.ppo.lr == 1e-5
    assert cfg.rewards[0].function == "japanese_ratio" and cfg.rewards[0].weight == 2
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.user_sections["env"] == {"max_steps": 8}


def test_bad_overrides(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        load_config(None, ("ppo.lr",))
    assert error_of(None, ("ppo.lrr=1",)) == "--set: ppo.lrr: unknown key 'lrr'; did you mean 'lr'?"
    assert error_of(None, ("ppo.lr=abc",)).startswith("--set: ppo.lr: Input should be a valid")


def test_parse_override_reads_yaml_values() -> None:
    assert parse_override("a.b=1") == (("a", "b"), 1)
    assert parse_override("a.b=3e-4") == (("a", "b"), 3e-4)
    assert parse_override("a.b=true") == (("a", "b"), True)
    assert parse_override("a.b=null") == (("a", "b"), None)
    assert parse_override("rewards.1.weight=0.5") == (("rewards", 1, "weight"), 0.5)
    assert parse_override("model.revision=v0.5") == (("model", "revision"), "v0.5")


def test_starter_template_is_the_defaults_and_documents_every_key() -> None:
    loaded = load_config(STARTER)
    assert loaded.warnings == []
    assert loaded.config == SwallowConfig()
    text = STARTER.read_text(encoding="utf-8")
    for key in config_keys():
        section, _, name = key.partition(".")
        assert f"\n{section}:" in text, section
        if name:
            assert f"  {name}:" in text, key


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(FIXTURES / "origin_config.yaml").config
    path = write(tmp_path, yaml.safe_dump(dump_config(cfg), allow_unicode=True))
    again = load_config(path)
    assert again.config == cfg
    assert again.warnings == []


def test_batch_sizes_by_hand() -> None:
    ppo = PPOSection(per_device_train_batch_size=8, grad_accum_steps=4, num_mini_batches=2)
    s = BatchSizes.of(ppo, num_processes=2)
    # mini = 8 x 4 x 2 processes = 64; per update = 64 x 2 mini-batches = 128.
    assert (s.micro_batch, s.mini_batch, s.samples_per_update) == (8, 64, 128)
    assert s.optimizer_steps_per_update == 2 * 4  # mini-batches x ppo_epochs
    ppo = PPOSection(per_device_train_batch_size=2, grad_accum_steps=3, total_episodes=100)
    s = BatchSizes.of(ppo)
    assert (s.total_updates, s.total_samples) == (17, 102)  # ceil(100 / 6) updates
