"""The `mzoo` command: one Typer app, one module per command group."""

from __future__ import annotations

import typer

from mzoo import __version__
from mzoo.cli import demo as demo_cmd
from mzoo.cli import init as init_cmd
from mzoo.cli import zoo as zoo_cmd
from mzoo.cli import data as data_cmd
from mzoo.cli import convert as convert_cmd
from mzoo.cli import inspect as inspect_cmd
from mzoo.cli import verify as verify_cmd
from mzoo.cli import train as train_cmd
from mzoo.cli import push as push_cmd
from mzoo.cli import generate as generate_cmd
from mzoo.cli import finetune as finetune_cmd
from mzoo.cli import plan as plan_cmd

app = typer.Typer(
    name="mzoo",
    help="Train, convert, reshard and ship LLMs on a Megatron-style parallel engine.\n\n"
    "Example: mzoo zoo list --family llama",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(zoo_cmd.app, name="zoo")
app.add_typer(data_cmd.app, name="data")
app.command("init")(init_cmd.init)
app.command("convert")(convert_cmd.convert)
app.command("reshard")(convert_cmd.reshard)
app.command("inspect")(inspect_cmd.inspect)
app.command("verify")(verify_cmd.verify)
app.command("train")(train_cmd.train)
app.command("push")(push_cmd.push)
app.command("generate")(generate_cmd.generate)
app.command("finetune")(finetune_cmd.finetune)
app.command("plan")(plan_cmd.plan)
app.command("demo")(demo_cmd.demo)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mzoo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.")) -> None:
    pass


def main() -> None:
    app()


if __name__ == "__main__":  # torchrun relaunches `python -m mzoo.cli.main train ...`
    main()
