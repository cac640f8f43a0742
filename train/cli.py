"""`sdprep train`: train an SDXL LoRA (textual inversion, fine-tune) from a kohya-compatible config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sdprep.train.loop.trainer import TrainCallbacks, TrainResult

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from sdprep.progress import Reporter
    from sdprep.train.methods.base import Verification

# plain option -> TrainConfig key (kohya name)
PLAIN = {
    "model": "pretrained_model_name_or_path",
    "model_config": "model_config",
    "data": "train_data_dir",
    "dataset_config": "dataset_config",
    "output_dir": "output_dir",
    "output_name": "output_name",
    "steps": "max_train_steps",
    "epochs": "max_train_epochs",
    "batch_size": "train_batch_size",
    "lr": "learning_rate",
    "resolution": "resolution",
    "dim": "network_dim",
    "alpha": "network_alpha",
    "mixed_precision": "mixed_precision",
    "sample_prompts": "sample_prompts",
    "logging_dir": "logging_dir",
}


class RichCallbacks(TrainCallbacks):
    """A rich progress bar (steps, loss, lr, ETA) on stderr; notes above it; quiet hides both."""

    def __init__(self, quiet: bool = False) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.quiet = quiet
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    def reporter(self) -> Reporter:
        from sdprep.progress import NullReporter, RichReporter

        return NullReporter() if self.quiet else RichReporter()

    def note(self, message: str) -> None:
        if not self.quiet or message.startswith(("warning", "note: warning")):
            self.console.print(message, markup=False)

    def start(self, total_steps: int, first_step: int, steps_per_epoch: int) -> None:
        if self.quiet:
            return
        from rich.progress import TextColumn

        from sdprep.progress import rich_bar

        self.progress = rich_bar(
            self.console,
            "training",
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  epoch {task.fields[epoch]}"),
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=total_steps, completed=first_step, loss="-", lr="-", epoch=1
        )

    def step(self, step: int, epoch: int, loss: float, lr: float) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", epoch=epoch)

    def saved(self, verification: Verification) -> None:
        self._print(f"saved {verification.path} (verified: {verification.summary().split(': ', 1)[1]})")

    def sampled(self, paths: list[Path]) -> None:
        if paths:
            self._print(f"samples: {len(paths)} images in {paths[0].parent}")

    def _print(self, message: str) -> None:
        if self.quiet:
            return
        (self.progress.console if self.progress is not None else self.console).print(message, markup=False)

    def end(self, result: TrainResult) -> None:
        self.stop()

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _overrides(plain: dict[str, Any], sets: tuple[str, ...]) -> dict[str, Any]:
    from sdprep.config import layer, parse_overrides

    values = {PLAIN[k]: v for k, v in plain.items() if v is not None}
    return layer(values, parse_overrides(list(sets)))


@click.command(
    "train",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    epilog="""\b
Example:
  sdprep train --config train.toml
  sdprep train --config train.toml --set learning_rate=5e-5 --steps 2000
  sdprep train --config train.toml -- --learning_rate=5e-6 --train_batch_size=4
  sdprep train --config train.toml --preflight
  sdprep train --config train.toml --plan
  sdprep train --config train.toml --resume latest
  sdprep train --config train.toml --output-config resolved.toml
  sdprep train --list-keys""",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Training TOML (sdprep's or kohya's flat config).",
)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
@click.option(
    "--method",
    type=click.Choice(["lora", "ti", "finetune"]),
    help="Force the method (default: from the keys, as kohya).",
)
@click.option(
    "--resume",
    metavar="DIR|latest",
    help="Continue from a saved training state folder (Ctrl-C saves one at the end of the current step).",
)
@click.option(
    "--preflight", is_flag=True, help="Run the config for a few steps on a tiny model to catch errors first."
)
@click.option(
    "--plan",
    "plan",
    is_flag=True,
    help="Print the GPU memory this config needs on SDXL, per part, and the settings that fit 8/12/16/24 GB "
    "cards; nothing is loaded or trained.",
)
@click.option(
    "--output-config",
    "--output_config",
    "output_config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the resolved config to this TOML and exit without training (kohya's --output_config).",
)
@click.option("--list-keys", is_flag=True, help="List every config key with its default and exit.")
@click.option("--model", help="pretrained_model_name_or_path: diffusers folder, .safetensors or hub id.")
@click.option(
    "--model-config",
    "--model_config",
    "model_config",
    type=click.Path(file_okay=False, path_type=Path),
    help="Local diffusers folder whose configs match a single file of another architecture "
    "(standard SDXL files, Pony and Illustrious included, need none).",
)
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    help="train_data_dir (folders named <repeats>_<token>).",
)
@click.option("--dataset-config", type=click.Path(dir_okay=False, path_type=Path), help="kohya dataset TOML.")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), help="Where outputs go.")
@click.option("--output-name", help="Output file stem.")
@click.option("--steps", type=int, help="max_train_steps.")
@click.option("--epochs", type=int, help="max_train_epochs.")
@click.option("--batch-size", type=int, help="train_batch_size.")
@click.option("--lr", type=float, help="learning_rate.")
@click.option("--resolution", help='resolution, e.g. 1024 or "832,1216".')
@click.option("--dim", type=int, help="network_dim (LoRA rank).")
@click.option("--alpha", type=float, help="network_alpha.")
@click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), help="mixed_precision.")
@click.option(
    "--sample-prompts", type=click.Path(dir_okay=False, path_type=Path), help="kohya sample prompt file."
)
@click.option(
    "--logging-dir", type=click.Path(file_okay=False, path_type=Path), help="TensorBoard log folder."
)
@click.pass_context
def command(
    ctx: click.Context,
    /,
    config_path: Path | None,
    sets: tuple[str, ...],
    method: str | None,
    resume: str | None,
    preflight: bool,
    plan: bool,
    output_config: Path | None,
    list_keys: bool,
    **plain: Any,
) -> None:
    """Train an SDXL LoRA (or textual inversion / fine-tune) from a kohya-compatible config.

    The config is sdprep's TOML or kohya's training TOML unchanged; kohya-style flags
    (--learning_rate=5e-6 --gradient_checkpointing ...) may follow, after `--` or directly.
    One rule decides which value wins: command line (kohya flags, plain options, --set) > config
    file > dataset TOML > defaults. Unknown keys are errors with a suggestion (--list-keys lists
    them all); kohya keys sdprep does not need are accepted with a note.
    Every saved file is reloaded and verified before it is reported.
    """
    from sdprep.clitools import verbosity
    from sdprep.compat import check_training_stack
    from sdprep.train.config.io import describe_keys, output_config_request, write_config
    from sdprep.train.config.schema import detect_method, load_train_config

    if list_keys:
        for name, text in describe_keys():
            click.echo(f"{name}: {text}")
        return
    check_training_stack()

    main_process = os.environ.get("RANK", "0") == "0"  # torchrun / accelerate launch: one process talks
    quiet = not main_process or bool(ctx.obj is not None and getattr(ctx.obj, "quiet", False))
    flags, kohya_output = output_config_request([a for a in ctx.args if a != "--"])
    output_config = output_config or kohya_output
    cfg, notes = load_train_config(config_path, overrides=_overrides(plain, sets) or None, flags=flags)
    chosen = detect_method(cfg, method)
    callbacks = RichCallbacks(quiet=quiet)
    for note in notes:
        callbacks.note(f"note: {note}")
    if output_config is not None:
        click.echo(f"wrote {write_config(cfg, output_config)} (the resolved config; nothing trained)")
        return
    if plan:
        from sdprep.train.memory.planner import plan_config

        click.echo(plan_config(cfg, chosen))
        return
    if preflight:
        from sdprep.train.config.preflight import run_preflight

        report = run_preflight(cfg, method=chosen, callbacks=callbacks, verbose=verbosity(ctx) > 0)
        click.echo(report.summary())
        if not report.ok:
            raise click.exceptions.Exit(1)
        return
    from sdprep.train.loop.trainer import train

    try:
        result = train(cfg, method=chosen, callbacks=callbacks, resume=resume)
    finally:
        callbacks.stop()
    if main_process:
        click.echo(result.summary())
