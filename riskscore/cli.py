"""The `riskscore` command line: one entry point, subcommands loaded lazily so --help is instant."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback

import click

COMMANDS = {
    "generate": ("riskscore.commands", "generate_cmd"),
    "features": ("riskscore.commands", "features_cmd"),
    "train": ("training.cli", "train_cmd"),
    "promote": ("training.cli", "promote_cmd"),
    "evaluate": ("training.cli", "evaluate_cmd"),
    "score": ("riskscore.commands", "score_cmd"),
    "drift": ("riskscore.commands", "drift_cmd"),
    "serve": ("serving.cli", "serve_cmd"),
    "keys": ("serving.cli", "keys_cmd"),
    "demo": ("riskscore.demo", "demo_cmd"),
}

SHORT_HELP = {
    "generate": "Generate synthetic declarations or transfers with planted typologies.",
    "features": "Build the point-in-time feature table of a dataset.",
    "train": "Train baseline + LightGBM, log to MLflow, register and promote.",
    "promote": "Promote a registered model version to champion by hand.",
    "evaluate": "Metrics of a registered model on a labelled file.",
    "score": "Batch-score a file offline with the champion, writing scores and top reasons.",
    "drift": "Feature and score drift of recent scores against the model's reference window.",
    "serve": "Start the BentoML scoring service locally.",
    "keys": "Create API keys (only their hashes are stored).",
    "demo": "Run the whole job end to end on synthetic data.",
}


class LazyGroup(click.Group):
    """Click group importing each subcommand only when it is invoked."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name]
        command = getattr(importlib.import_module(module), attr)
        command.short_help = SHORT_HELP[name]
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, SHORT_HELP[name]) for name in COMMANDS])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug details.")
@click.version_option(package_name="riskscore")
def cli(verbose: bool) -> None:
    """riskscore: risk scores with explanations for customs shipments and money flows."""
    level = logging.DEBUG if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font scan is hundreds of debug lines
    for handler in logging.getLogger().handlers:  # libraries that set their own loggers to INFO (Dask, MLflow)
        handler.setLevel(level)                   # still reach this handler: it filters too
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported (lazily, later)


def main() -> None:
    """Console entry point: one-line reason and exit code 1 on any failure."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.exceptions.Abort:
        click.echo("riskscore: aborted", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as err:  # bare `riskscore` or `riskscore keys`: the help
        click.echo(err.ctx.get_help() if err.ctx else err.format_message())
        sys.exit(0)
    except click.ClickException as err:
        if _verbose() and err.__cause__ is not None:  # a failure the command turned into its one line
            traceback.print_exception(err.__cause__)
        click.echo(f"riskscore: {err.format_message()}", err=True)
        sys.exit(err.exit_code or 1)
    except Exception as err:  # the contract: one line and exit != 0
        if _verbose():
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        click.echo(f"riskscore: {first}", err=True)
        sys.exit(1)


def _verbose() -> bool:
    return "-v" in sys.argv[1:2] or "--verbose" in sys.argv[1:2]
