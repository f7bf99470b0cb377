"""The `swallowctl` command line: parse, call the library, render. Nothing else lives here.

Heavy libraries are imported inside the commands that need them: `swallowctl --help` must start
in well under a second and import no torch.
"""

from __future__ import annotations

import dataclasses
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from swallowctl import __version__
from swallowctl.core import console
from swallowctl.core.errors import UsageError


class _Group(TyperGroup):
    """Maps every SwallowError (and Ctrl-C) to one stderr line and its exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # Typer's own usage errors and exits: it renders them (exit 2 for usage)
        except KeyboardInterrupt:
            if not console.state.secondary:  # every training process got it; one says so
                console.err.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as e:
            raise typer.Exit(console.report_error(e)) from None


def _app(help_text: str) -> typer.Typer:
    return typer.Typer(
        cls=_Group,
        help=help_text,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        rich_markup_mode="rich",
        context_settings={"help_option_names": ["-h", "--help"]},
    )


app = _app(
    "PPO-tune Llama-3.1-Swallow-8B on one GPU (4-bit QLoRA), then run it on PyTorch or MLX.\n\n"
    "MLX is inference only: training needs PyTorch (CUDA for real runs)."
)
config_app = _app("Write, show and check config files.")
app.add_typer(config_app, name="config")
env_app = _app("Check an environment class (reset / observe / step) before training with it.")
app.add_typer(env_app, name="env")


def _complete_set(incomplete: str) -> list[str]:
    from swallowctl.core.config import config_keys

    return [k + "=" for k in config_keys() if k.startswith(incomplete)]


# Shared options: one definition each, so every command spells them the same.
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="YAML config (default: built-in settings, the seed's).",
        envvar="SWALLOWCTL_CONFIG",
        dir_okay=False,
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override a config key, KEY.PATH=VALUE (repeatable), e.g. --set ppo.lr=2e-5.",
        autocompletion=_complete_set,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="More logging; tracebacks on errors.")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")]


class Backend(StrEnum):
    torch = "torch"
    mlx = "mlx"


class DeepSpeed(StrEnum):
    zero2 = "zero2"


BackendOpt = Annotated[
    Backend, typer.Option("--backend", help="torch (train and infer) or mlx (inference only).")
]


def _start(verbose: bool, quiet: bool) -> None:
    if verbose and quiet:
        raise UsageError("--verbose and --quiet contradict each other; give one")
    console.setup_logging(verbose=verbose, quiet=quiet)


def _load(config: Path | None, overrides: list[str] | None) -> Any:
    from swallowctl.core.config import load_config

    loaded = load_config(config, overrides or ())
    for w in loaded.warnings:
        console.warn(w)
    return loaded


# --- commands filled in by later work: registered now, honest about it -------------------------


PatternOpt = Annotated[list[str] | None, typer.Option(help="Glob pattern (repeatable).")]


@app.command()
def download(
    model: Annotated[
        str | None, typer.Argument(help="Alias or Hub id (default: Swallow-8B-Instruct v0.5).")
    ] = None,
    mlx: Annotated[bool, typer.Option("--mlx", help="Fetch the MLX 4-bit twin.")] = False,
    revision: Annotated[str | None, typer.Option(help="Branch, tag or commit.")] = None,
    local_dir: Annotated[
        Path | None, typer.Option(help="Download here instead of the Hub cache.", file_okay=False)
    ] = None,
    include: PatternOpt = None,
    exclude: PatternOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List files and total size; fetch nothing.")
    ] = False,
    json_: JsonOpt = False,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fetch the model (or its MLX 4-bit twin) from the Hub; interrupted downloads resume."""
    from swallowctl.hub import download as fetch
    from swallowctl.hub import plan_download

    _start(verbose, quiet)
    plan = plan_download(
        model, mlx=mlx, revision=revision, include=include, exclude=exclude, local_dir=local_dir
    )
    if dry_run:
        if json_:
            console.print_json(dataclasses.asdict(plan))
        else:
            console.render_download_plan(plan)
        return
    with console.download_progress() as bar:
        result = fetch(plan, on_progress=console.file_progress(bar))
    if json_:
        console.print_json(dataclasses.asdict(result))
        return
    console.print_text(f"{result.repo_id} @ {result.commit}")
    console.print_text(f"files: {result.path}")


@app.command()
def doctor(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    backend: BackendOpt = Backend.torch,
    json_: JsonOpt = False,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Check whether this machine can train or infer the configured model, and what to fix."""
    from swallowctl.doctor import run_doctor

    _start(verbose, quiet)
    loaded = _load(config, set_)
    report = run_doctor(loaded.config, backend.value)
    if json_:
        console.print_json(report.model_dump(mode="json"))
    else:
        console.render_doctor(report)
    if report.failed:
        raise typer.Exit(1)


@app.command("tune-memory")
def tune_memory(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", help="Size this model instead of the config's (alias, Hub id, dir)."
        ),
    ] = None,
    vram: Annotated[
        float | None,
        typer.Option(
            "--vram",
            help="GPU memory to fit in, GiB (default: model.max_memory_per_device_gib, "
            "else this machine's free GPU memory).",
        ),
    ] = None,
    write: Annotated[
        bool, typer.Option("--write", help="Write the suggestion into the --config file.")
    ] = False,
    probe: Annotated[
        bool,
        typer.Option(
            "--probe", help="CUDA: run one real rollout + update and compare with the estimate."
        ),
    ] = False,
    json_: JsonOpt = False,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Find batch, grad-accum and rollout sizes that fit the GPU.

    Exit 0 with the fastest settings that fit; exit 1 when nothing fits, with what to give up.
    --write edits --config in place (comments kept); otherwise paste the --set options shown.
    """
    from swallowctl.memory import tune_config, write_changes
    from swallowctl.memory.render import renderables, to_json

    _start(verbose, quiet)
    if write and config is None:
        raise UsageError("--write needs --config FILE", hint="or paste the --set options shown")
    loaded = _load(config, set_)
    result = tune_config(loaded.config, model=model, vram_gib=vram)
    written = write_changes(config, result.changes) if write and config and result.changes else []
    runs = _probe(loaded.config, result, model) if probe else None
    if json_:
        doc = to_json(result, written)
        if runs is not None:
            doc["probe"] = [dataclasses.asdict(r) for r in runs]
        console.print_json(doc)
    else:
        for item in renderables(result, written):
            console.out.print(item)
        if runs is not None:
            from swallowctl.memory.render import probe_table

            console.out.print(probe_table(runs))
    if not result.fits or (runs is not None and all(r.oom for r in runs)):
        raise typer.Exit(1)


def _probe(cfg: Any, result: Any, model: str | None) -> Any:
    from swallowctl.memory.probe import apply_changes, probe

    return probe(apply_changes(cfg, {"model.name_or_path": model}) if model else cfg, result)


@app.command()
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest complete checkpoint.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Check config, data and rewards; print the plan; stop."),
    ] = False,
    num_processes: Annotated[
        int | None,
        typer.Option(
            "--num-processes",
            min=1,
            help="Train data-parallel in N processes (one per GPU), launched through Accelerate.",
        ),
    ] = None,
    accelerate_config: Annotated[
        Path | None,
        typer.Option(
            "--accelerate-config",
            help="An Accelerate config file (accelerate config) for the launch.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    deepspeed: Annotated[
        DeepSpeed | None,
        typer.Option("--deepspeed", help="DeepSpeed ZeRO stage for the launch (needs deepspeed)."),
    ] = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """PPO (ours), GRPO or RLOO (TRL's) with QLoRA on one 4-bit base (PyTorch only; not MLX)."""
    from swallowctl import launch
    from swallowctl.core.paths import check_creatable
    from swallowctl.ppo import critic_free, trainer_class
    from swallowctl.ppo.trainer import check_inputs, make_plan

    rank, world = launch.process_rank()
    # One process needs no launcher: it trains here (and a resume check answers at once).
    launching = (num_processes or 1) > 1 or accelerate_config is not None or deepspeed is not None
    if (launching or num_processes is not None) and world > 1:
        raise UsageError(
            "--num-processes, --accelerate-config and --deepspeed start the processes; "
            "this one was already started by a launcher",
            hint="leave them out under accelerate launch, or run swallowctl train without it",
        )
    _start(verbose, quiet)
    if rank > 0:
        console.be_secondary()  # only the main process talks
    launch.check_deepspeed(deepspeed)
    cfg = _load(config, set_).config
    ppo = cfg.ppo.algorithm == "ppo"  # else grpo / rloo, through TRL (ppo.algorithm)
    check_creatable(Path(cfg.output.dir), "output.dir", folder=True)
    plan = make_plan(cfg, launch.planned_processes(num_processes, accelerate_config) * world)
    if not launch.started_by_us():  # else the launching process has said and checked it
        for line in plan.lines() + ([] if ppo else critic_free.plan_lines(cfg, plan.num_processes)):
            console.info(line)
        if ppo:
            check_inputs(cfg)
        else:
            critic_free.check_inputs(cfg)
    if dry_run:
        console.print_text("dry run: config, data and rewards are valid; nothing trained")
        return
    if resume:
        critic_free.check_run_algorithm(cfg)  # a run of another algorithm cannot continue
    if launching:
        args = ["train", *(["--config", str(config)] if config else [])]
        args += [a for s in set_ or () for a in ("--set", s)]
        args += [
            f for f, on in (("--resume", resume), ("--verbose", verbose), ("--quiet", quiet)) if on
        ]
        code = launch.launch(
            launch.launch_args(
                num_processes, accelerate_config, deepspeed and deepspeed.value, args
            ),
            verbose=verbose,
        )
        raise typer.Exit(code)
    with console.update_progress(plan.sizes.total_updates) as on_update:
        result = trainer_class(cfg)(cfg, resume=resume, on_update=on_update).run()
    if rank == 0:
        console.print_text(f"adapter: {result.final_dir}")
    if result.stopped_early:
        console.warn(f"stopped early: {result.stopped_early}")


ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Alias, Hub id, local folder or builtin:tiny-ja (default: the adapter's base, else "
        "the config's; on MLX a known model's MLX twin).",
    ),
]
AdapterOpt = Annotated[
    Path | None,
    typer.Option(
        "--adapter",
        help="A trained adapter: RUN_DIR/final or RUN_DIR/checkpoint-N.",
        file_okay=False,
    ),
]

DEFAULT_EPISODES = 16  # infer --env: enough for a first accuracy figure, quick on a tiny model

INFER_EXAMPLES = """Examples:

  swallowctl infer --adapter runs/ppo/final                    (chat; /reset /system /exit)

  swallowctl infer --backend mlx --prompt 'こんにちは'

  swallowctl infer --mode intervention --input obs.jsonl --output answers.jsonl

  swallowctl infer -c examples/intervention.yaml --adapter runs/intervention/final --episodes 32
"""


@app.command(epilog=INFER_EXAMPLES)
def infer(
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="Answer one prompt, streamed to stdout.")
    ] = None,
    input_: Annotated[
        Path | None,
        typer.Option(
            "--input", "-i", help="JSONL rows (prompt or messages) to answer.", dir_okay=False
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="JSONL answers for --input; a rerun resumes.", dir_okay=False
        ),
    ] = None,
    backend: BackendOpt = Backend.torch,
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    mode: Annotated[
        str | None,
        typer.Option(help="chat, intervention or a mode of the config (default: data.mode)."),
    ] = None,
    system: Annotated[str | None, typer.Option(help="Replace the mode's system prompt.")] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Sampling temperature (default 0.7; 0 = greedy).")
    ] = None,
    top_p: Annotated[
        float | None, typer.Option("--top-p", help="Nucleus sampling mass (default 0.9).")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", help="Length limit (default 512).")
    ] = None,
    greedy: Annotated[
        bool,
        typer.Option(
            "--greedy", help="Always the likeliest token (default for modes with choices)."
        ),
    ] = False,
    seed: Annotated[int | None, typer.Option(help="Sampling seed: same seed, same answer.")] = None,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", help="--input rows (or --env episodes) per generate call (torch)."
        ),
    ] = 8,
    limit: Annotated[
        int | None, typer.Option(help="Answer at most N new --input rows, then stop.")
    ] = None,
    env: Annotated[
        str | None,
        typer.Option(
            "--env",
            help="Play episodes in this environment (module:Class; default with --episodes: "
            "environment.entrypoint).",
        ),
    ] = None,
    episodes: Annotated[
        int | None,
        typer.Option(
            "--episodes", min=1, help=f"Episodes to play in the environment ({DEFAULT_EPISODES})."
        ),
    ] = None,
    max_steps: Annotated[
        int, typer.Option("--max-steps", min=1, help="End an --env episode after N steps.")
    ] = 100,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    json_: JsonOpt = False,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Chat, answer one prompt, run a JSONL batch, or play episodes (--backend torch|mlx).

    MLX is inference only (Apple Silicon; Linux runs it on the CPU). Modes with choices, such as
    intervention, answer greedily and print the chosen label (exit 1 when none parses). --env /
    --episodes play whole episodes greedily inside an environment and report returns, lengths,
    choices, output errors and accuracy; --output FILE.jsonl keeps every step.
    """
    from swallowctl.infer import batch, choose_model, open_backend, read_adapter, session

    _start(verbose, quiet)
    in_env = env is not None or episodes is not None
    session.check_flags(
        prompt=prompt,
        input_path=input_,
        output=output,
        json_=json_,
        batch_size=batch_size,
        limit=limit,
        env=in_env,
    )
    cfg = _load(config, set_).config
    spec = session.resolve_mode(cfg, mode, system)
    sampling_asked = temperature is not None or top_p is not None
    settings = session.resolve_settings(
        cfg,
        spec,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        greedy=greedy or (in_env and not sampling_asked),  # an evaluation is greedy by default
        seed=seed,
    )
    if in_env:
        env_class = _environment_class(env, cfg)
        if output is not None:
            from swallowctl.infer.episodes import check_steps_path

            check_steps_path(output)
    # Everything that can be wrong with the input is found before a model loads.
    plan = batch.plan_batch(input_, output, spec) if input_ and output else None
    messages = session.messages_for(prompt, spec) if prompt is not None else None
    info = read_adapter(adapter) if adapter else None
    resolved, load_id = choose_model(model, info, cfg, backend=backend.value)
    done = plan is not None and not plan.todo  # a finished batch: no model to load
    engine = None if done else open_backend(backend.value, resolved, load_id, cfg, info)
    if in_env and engine is not None:
        from swallowctl.infer import episodes as play

        n = episodes or DEFAULT_EPISODES
        with play.episode_progress(n) as on_step:
            report = play.play_backend(
                engine,
                settings,
                cfg,
                env_class,
                spec,
                mode or cfg.data.mode,
                episodes=n,
                seed=cfg.ppo.seed if seed is None else seed,
                batch_size=batch_size,
                max_steps=max_steps,
                output=output,
                on_step=on_step,
            )
        if json_:
            data = report.to_json()
            data.update(backend=engine.name, model=engine.model_name, output=output)
            console.print_json({**data, "adapter": str(info.path) if info else None})
        else:
            for line in play.render_summary(report):
                console.print_text(line)
            rows = [(e.index, e.seed, f"{e.ret:+.3f}", e.length, e.end) for e in report.episodes]
            columns = ("episode", "seed", "return", "steps", "end")
            console.out.print(console.table(None, columns, rows))
            if output:
                console.info(f"every step is in {output}")
    elif plan is not None:
        todo = len(plan.todo[:limit] if limit else plan.todo)
        try:
            with batch.batch_progress(todo) as on_rows:
                result = batch.run_batch(
                    engine,
                    plan,
                    spec,
                    settings,
                    batch_size=batch_size,
                    limit=limit,
                    on_rows=on_rows,
                )
        except KeyboardInterrupt:
            console.warn("interrupted: the rows written are kept; rerun to continue")
            raise typer.Exit(130) from None
        if json_:
            console.print_json(result.to_json())
        else:
            invalid = f"; {result.no_choice} without a valid choice" if spec.choices else ""
            console.print_text(
                f"{result.written} rows written to {result.output} ({result.skipped} done "
                f"before, {result.remaining} left{invalid})"
            )
    elif messages is not None and engine is not None:
        stream = None if json_ or spec.choices else session.write_text
        ans = session.answer(engine, messages, settings, spec, on_text=stream)
        if json_:
            console.print_json(ans.to_json())
        else:
            console.print_text(session.choice_line(ans.text, spec) if spec.choices else "")
        if spec.choices and ans.choice is None:
            raise typer.Exit(1)
    elif engine is not None:
        session.ChatRepl(engine, spec, settings).run()


def _environment_class(entrypoint: str | None, cfg: Any) -> type:
    """`--env`, else the config's environment.entrypoint, imported and checked."""
    from swallowctl.ppo.environment import load_environment_class

    spec = entrypoint or (cfg.environment.entrypoint if cfg.environment else None)
    if not spec:
        raise UsageError(
            "--episodes: which environment? Give --env package.module:Class",
            hint="or a --config with environment.entrypoint",
        )
    return load_environment_class(spec, where="--env" if entrypoint else "environment.entrypoint")


class ExportFormat(StrEnum):
    merged = "merged"
    mlx = "mlx"
    mlx_adapter = "mlx-adapter"


class ExportDtype(StrEnum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


EXPORT_EXAMPLES = """Examples:

  swallowctl export runs/ppo/final --format merged --output swallow-ppo

  swallowctl export runs/ppo/final --format mlx --output swallow-ppo-mlx-4bit

  swallowctl export runs/ppo/final --format mlx-adapter --output swallow-ppo-mlx-adapter
"""


@app.command(epilog=EXPORT_EXAMPLES)
def export(
    run: Annotated[
        Path, typer.Argument(help="A trained adapter: RUN_DIR/final or RUN_DIR/checkpoint-N.")
    ],
    format_: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            help="merged (transformers), mlx (merged + mlx_lm.convert) or mlx-adapter.",
        ),
    ] = ExportFormat.merged,
    output: Annotated[
        Path | None,
        typer.Option(help="Folder to write (default: RUN_DIR/export-FORMAT).", file_okay=False),
    ] = None,
    model: ModelOpt = None,
    dtype: Annotated[
        ExportDtype | None,
        typer.Option(help="Merged weights' dtype (default bfloat16; float32 for builtin:tiny-ja)."),
    ] = None,
    quantize: Annotated[
        bool, typer.Option("--quantize/--no-quantize", help="--format mlx: quantize (default).")
    ] = True,
    q_bits: Annotated[int, typer.Option("--q-bits", help="--format mlx: bits per weight.")] = 4,
    q_group_size: Annotated[
        int, typer.Option("--q-group-size", help="--format mlx: weights per scale.")
    ] = 64,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a non-empty --output folder.")
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    json_: JsonOpt = False,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Merge an adapter, or convert it for MLX (--format merged|mlx|mlx-adapter)."""
    from swallowctl.export import export as run_export
    from swallowctl.export import result_dict

    _start(verbose, quiet)
    result = run_export(
        run,
        format_.value,
        output,
        cfg=_load(config, set_).config,
        model=model,
        dtype=dtype.value if dtype else None,
        quantize=quantize,
        q_bits=q_bits,
        q_group_size=q_group_size,
        force=force,
    )
    if json_:
        console.print_json(result_dict(result))
        return
    console.print_text(f"{result.format} export of {result.adapter} (base {result.base_model})")
    console.print_text(f"written to {result.output}")


# --- config and version ------------------------------------------------------------------------


FileArg = Annotated[
    Path | None, typer.Argument(help="Config file (same as --config).", dir_okay=False)
]


def _pick(file: Path | None, config: Path | None) -> Path | None:
    if file and config and file != config:
        raise UsageError(f"two config files given ({file} and --config {config}); give one")
    return file or config


@config_app.command("init")
def config_init(
    path: Annotated[Path, typer.Argument(help="Where to write.", dir_okay=False)] = Path(
        "swallowctl.yaml"
    ),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write a commented starter config with every key and its default."""
    from swallowctl.core.config import write_starter

    _start(verbose, quiet)
    write_starter(path, force=force)
    console.err.print(f"wrote {path}; check it with: swallowctl config validate {path}")


@config_app.command("show")
def config_show(
    file: FileArg = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    json_: JsonOpt = False,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Print the resolved config (--set > file > defaults) and the batch sizes it implies."""
    from swallowctl.core.config import dump_config, render_yaml

    _start(verbose, quiet)
    loaded = _load(_pick(file, config), set_)
    sizes = loaded.config.sizes()
    if json_:
        console.print_json(
            {
                "config": dump_config(loaded.config),
                "sizes": vars(sizes),
                "warnings": loaded.warnings,
            }
        )
        return
    console.print_text(render_yaml(loaded.config, sizes))


@config_app.command("validate")
def config_validate(
    file: FileArg = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    json_: JsonOpt = False,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Check a config file; errors name FILE:LINE and the key (exit 2)."""
    _start(verbose, quiet)
    path = _pick(file, config)
    loaded = _load(path, set_)
    name = str(path) if path else "the default config"
    if json_:
        console.print_json(
            {"file": str(path) if path else None, "valid": True, "warnings": loaded.warnings}
        )
    elif not quiet:
        n = len(loaded.warnings)
        console.print_text(f"{name} is valid" + (f" ({n} warning{'s' * (n != 1)})" if n else ""))


ENV_CHECK_EXAMPLES = """Examples:

  swallowctl env check examples.intervention_env:InterventionEnv -c examples/intervention.yaml

  swallowctl env check my_env:MyEnv --mode intervention --episodes 10 --json
"""


@env_app.command("check", epilog=ENV_CHECK_EXAMPLES)
def env_check(
    entrypoint: Annotated[
        str | None,
        typer.Argument(help="package.module:Class (default: the config's environment.entrypoint)."),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    mode: Annotated[
        str | None, typer.Option(help="Mode the observations are laid out in (default: data.mode).")
    ] = None,
    episodes: Annotated[int, typer.Option("--episodes", min=1, help="Episodes to run.")] = 4,
    max_steps: Annotated[
        int, typer.Option("--max-steps", min=1, help="Stop an episode after this many steps.")
    ] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the episodes and the random actions.")] = 0,
    json_: JsonOpt = False,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run a few episodes with fixed and random actions: latency, rewards, errors (exit 1).

    Settings and sections come from --config, as in training; each call gets
    environment.timeout_s and no retries, so the first failure is reported.
    """
    from swallowctl.core.errors import RuntimeFailure
    from swallowctl.ppo.environment import check_environment, render_check

    _start(verbose, quiet)
    cfg = _load(config, set_).config
    env = cfg.environment
    spec = entrypoint or (env.entrypoint if env else None)
    if not spec:
        raise UsageError(
            "name the environment: swallowctl env check package.module:Class",
            hint="or give --config with environment.entrypoint",
        )
    name = mode or cfg.data.mode
    try:
        spec_mode = cfg.mode(name)
    except KeyError:
        raise UsageError(f"--mode {name}: unknown mode", hint="see modes: in the config") from None
    report = check_environment(
        spec,
        env.settings if env else {},
        cfg.user_sections,
        spec_mode,
        mode_name=name,
        episodes=episodes,
        max_steps=max_steps,
        seed=seed,
        timeout_s=env.timeout_s if env else 120.0,
    )
    if json_:
        console.print_json(report.to_json())
    else:
        for line in render_check(report):
            console.print_text(line)
    if report.problems:
        raise RuntimeFailure(
            report.problems[0], hint=report.hint or "fix the environment, then run env check again"
        )


@app.command()
def version(json_: JsonOpt = False) -> None:
    """Print the version of swallowctl and of the libraries it uses."""
    from swallowctl.core.env import package_versions

    if json_:
        console.print_json({"swallowctl": __version__, "packages": package_versions()})
        return
    console.print_text(f"swallowctl {__version__}")
    for name, v in package_versions().items():
        console.print_text(f"  {name} {v or '(not installed)'}")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="swallowctl")
