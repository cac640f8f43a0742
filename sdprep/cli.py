"""The `sdprep` root command: lazy subcommands, global flags, and the one error boundary.

Subcommands are imported only when invoked, so `sdprep --help` starts fast and imports no torch.
To add a command, add a line to COMMANDS: name -> ("module:attribute", one-line help).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from sdprep import __version__
from sdprep.errors import SdprepError, did_you_mean, escape_unencodable_output, from_os_error

COMMANDS: dict[str, tuple[str, str]] = {
    "scrape": (
        "sdprep.prep.cli.scrape:command",
        "Download images with gallery-dl, tagged from booru metadata.",
    ),
    "upscale": (
        "sdprep.prep.cli.upscale:command",
        "Upscale small images to the training size (Lanczos or a model).",
    ),
    "dedup": ("sdprep.prep.cli.dedup:command", "Move perceptual duplicates aside, keeping the best copy."),
    "convert": ("sdprep.prep.cli.convert:command", "Normalise image formats, EXIF rotation and alpha."),
    "rename": ("sdprep.prep.cli.rename:command", "Sequential image names; captions, sidecars, masks follow."),
    "bucket": (
        "sdprep.prep.cli.bucket:command",
        "Build a training-ready folder: repeat folders, dataset TOML, metadata, bucket preview.",
    ),
    "mask": ("sdprep.prep.cli.mask:command", "Masks for masked-loss training: generate, import, check."),
    "tag": (
        "sdprep.prep.cli.tag:command",
        "WD14 tags (and optional VLM captions) into captions; scores kept for re-tuning.",
    ),
    "clean": (
        "sdprep.prep.cli.clean:command",
        "Rebuild captions from rules: trigger, remove, prune, sort, monochrome, tokens.",
    ),
    "captions": (
        "sdprep.prep.cli.captions:command",
        "Batch-edit caption folders: replace, remove, prepend, append, dedupe, sort, stats, find.",
    ),
    "report": (
        "sdprep.prep.cli.report:command",
        "Write a self-contained HTML (or JSON) report of a dataset.",
    ),
    "review": (
        "sdprep.prep.cli.review:command",
        "A local web page to look at, fix and approve a dataset (captions, tags, masks, undo).",
    ),
    "run": (
        "sdprep.commands:run_command",
        "Run the chain of stages (and training) described by a project file.",
    ),
    "init": ("sdprep.commands:init_command", "Write a commented starting project file."),
    "train": (
        "sdprep.train.cli:command",
        "Train an SDXL LoRA (kohya-compatible config); verified saves, resume, preflight.",
    ),
    "undo": ("sdprep.commands:undo_command", "Undo the last sdprep change to a dataset folder."),
    "doctor": (
        "sdprep.commands:doctor_command",
        "Show versions, GPU (CUDA/ROCm/MPS), ONNX providers and disk space.",
    ),
    "gc": (
        "sdprep.commands:gc_command",
        "Delete the undo journal (and the old files it keeps) of a dataset.",
    ),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use; library errors become `Error: ...` + exit 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        target, _ = COMMANDS[name]
        module, attr = target.split(":")
        command: click.Command = getattr(importlib.import_module(module), attr)
        return command

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name = click.utils.make_str(args[0]) if args else ""
        if args and name not in COMMANDS and not name.startswith("-"):
            hint = did_you_mean(name, COMMANDS)
            ctx.fail(f"No such command '{name}'." + (f" {hint[0].upper()}{hint[1:]}" if hint else ""))
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SdprepError as exc:
            raise click.ClickException(str(exc)) from exc
        except BrokenPipeError:
            raise  # `sdprep ... | head`: click's own handling
        except OSError as exc:  # the file system refused (disk full, permissions...): not a bug
            raise click.ClickException(str(from_os_error(exc))) from exc


class AppState:
    """Global flags, available to commands as `ctx.obj`."""

    def __init__(self, verbose: int = 0, quiet: bool = False):
        self.verbose = verbose
        self.quiet = quiet


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Example: sdprep tag data/ && sdprep clean data/ --trigger mytoken && sdprep bucket data/ -o out/",
)
@click.version_option(__version__, "--version", prog_name="sdprep")
@click.option("-v", "--verbose", count=True, help="More output (repeat for more).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; only results and errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Prepare datasets for and train Stable Diffusion XL models.

    A staged pipeline over a dataset folder (scrape, rename, upscale, mask, tag, clean, bucket,
    report) and a built-in SDXL trainer. Every change to a dataset can be undone with `sdprep undo`.
    """
    escape_unencodable_output(sys.stdout, sys.stderr)  # a file name that is not UTF-8 never crashes output
    ctx.obj = AppState(verbose=verbose, quiet=quiet)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="sdprep")


if __name__ == "__main__":  # pragma: no cover
    main()
