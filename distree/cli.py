"""The ``distree`` command line: thin click adapters over the typed Python API.

Each subcommand lives next to the code it drives (``distree/<part>/commands.py``) and is registered
below. A :class:`~distree.errors.DistreeError` becomes one ``error: ...`` line and exit status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import click

from distree import __version__
from distree.errors import DistreeError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DistreeError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="distree")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """distree: compile a classifier into a distributed early-exit pipeline for edge devices.

    \b
    Typical use:
      distree compile model.onnx --devices pi4,jetson-orin-nano --data calib.npz -o bundle/
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main() -> None:
    cli(prog_name="distree")


# --- subcommands (one line each; keep sorted) -------------------------------------------------------
from distree.graph.commands import inspect_cmd; cli.add_command(inspect_cmd)  # noqa: E402
from distree.targets.commands import devices_cmd; cli.add_command(devices_cmd)  # noqa: E402
from distree.solver.commands import plan_cmd; cli.add_command(plan_cmd)  # noqa: E402
from distree.compiler.commands import compile_cmd; cli.add_command(compile_cmd)  # noqa: E402
from distree.compiler.commands import verify_cmd; cli.add_command(verify_cmd)  # noqa: E402
from distree.runtime.commands import run_cmd; cli.add_command(run_cmd)  # noqa: E402
from distree.runtime.commands import serve_cmd; cli.add_command(serve_cmd)  # noqa: E402
from distree.runtime.commands import infer_cmd; cli.add_command(infer_cmd)  # noqa: E402
from distree.exits.commands import exits_cmd; cli.add_command(exits_cmd)  # noqa: E402
from distree.exits.commands import calibrate_cmd; cli.add_command(calibrate_cmd)  # noqa: E402
from distree.profiler.commands import profile_cmd; cli.add_command(profile_cmd)  # noqa: E402
from distree.sim.commands import simulate_cmd; cli.add_command(simulate_cmd)  # noqa: E402
from distree.bench.commands import bench_cmd; cli.add_command(bench_cmd)  # noqa: E402
