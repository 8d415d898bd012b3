"""The `dsfuse` Typer app: one module per command, registered here."""

from __future__ import annotations

import importlib
import sys

import typer

try:  # typer >= 0.26 vendors click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer on real click
    from click import exceptions as click_errors

from dsfuse import __version__

# Each module has `register(app)` and may have `demo_steps(samples, out)` (see cli/demo.py).
COMMAND_MODULES = [  # in the order `--help` lists them and `demo` runs them
    "dsfuse.cli.info",
    "dsfuse.cli.train_vqvae",
    "dsfuse.cli.tokenize_image",
    "dsfuse.cli.train_ddpm",
    "dsfuse.cli.sample",
    "dsfuse.cli.make_shapes",
    "dsfuse.cli.train_unified",
    "dsfuse.cli.caption",
    "dsfuse.cli.train_moe",
    "dsfuse.cli.moe",
    "dsfuse.cli.classify_video",
    "dsfuse.cli.audio_emotion",
    "dsfuse.cli.compress",
    "dsfuse.cli.train_compressor",
    "dsfuse.cli.chat",
    "dsfuse.cli.mcp",
    "dsfuse.cli.demo",
]

app = typer.Typer(
    name="dsfuse",
    help="DeepSeek-style multimodal building blocks: tokenizers, diffusion, video, audio, MoE, agents.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dsfuse {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """DeepSeek-style multimodal building blocks."""


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point: usage errors become one line and exit code 2."""
    try:
        code = app(args=argv, prog_name="dsfuse", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as e:
        print(e.ctx.get_help() if e.ctx else str(e), file=sys.stderr)
        code = 2
    except typer.Exit as e:
        code = e.exit_code
    except click_errors.UsageError as e:
        hint = f" (see: dsfuse {e.ctx.command_path.partition(' ')[2]} --help)".replace("  ", " ") if e.ctx else ""
        print(f"error: {e.format_message()}{hint}", file=sys.stderr)
        code = 2
    except typer.Abort:
        print("error: interrupted", file=sys.stderr)
        code = 130
    except click_errors.ClickException as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        code = e.exit_code
    sys.exit(code if isinstance(code, int) else 0)
