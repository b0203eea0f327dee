"""The ``distree`` command line: thin click adapters over the typed Python API.

Each subcommand lives next to the code it drives (``distree/<part>/commands.py``) and is registered
below; its module is imported only when the subcommand runs (or ``--help`` lists it), so a device that
installed distree without the build machine's packages still serves, runs, verifies, benches and profiles.
A :class:`~distree.errors.DistreeError` becomes one ``error: ...`` line and exit status 2; ``--debug``
shows the traceback instead. Work that Ctrl-C stops and a rerun resumes (profiling) says so on one ``stopped: ...``
line, exit status 130 (the shell's for SIGINT).
"""

from __future__ import annotations

import math
from importlib import import_module
from pathlib import Path

import click

from distree import __version__
from distree.errors import DistreeError
from distree.serde import unwritable

# name: "module:attribute" (keep sorted)
COMMANDS = {
    "bench": "distree.bench.commands:bench_cmd",
    "calibrate": "distree.exits.commands:calibrate_cmd",
    "compile": "distree.compiler.commands:compile_cmd",
    "devices": "distree.targets.commands:devices_cmd",
    "exits": "distree.exits.commands:exits_cmd",
    "infer": "distree.runtime.commands:infer_cmd",
    "inspect": "distree.graph.commands:inspect_cmd",
    "plan": "distree.solver.commands:plan_cmd",
    "profile": "distree.profiler.commands:profile_cmd",
    "retune": "distree.compiler.commands:retune_cmd",
    "run": "distree.runtime.commands:run_cmd",
    "serve": "distree.runtime.commands:serve_cmd",
    "simulate": "distree.sim.commands:simulate_cmd",
    "stats": "distree.runtime.commands:stats_cmd",
    "verify": "distree.compiler.commands:verify_cmd",
}
STOPPED_EXIT_CODE = 130     # 128 + SIGINT, as a shell reports a process Ctrl-C ended
BUILD_EXTRA = "compile"     # pyproject's extra with what only the build machine needs (solver, SciPy, plots, tuning)


def _missing_package(exc: ModuleNotFoundError) -> str | None:
    """The third-party package an import found missing (None: a distree module, which is a bug, not an install)."""
    package = (exc.name or "").split(".")[0]
    return package if package and package != "distree" else None


def missing_package_error(command: str, package: str) -> DistreeError:
    return DistreeError(f"`distree {command}` needs the Python package {package!r}, which is not "
                        f"installed here; on the build machine install distree with `pip install "
                        f"'distree[{BUILD_EXTRA}]'` (a device that only serves, runs, verifies, benches or profiles "
                        f"needs just `pip install distree`)")


class OutputPath(click.ParamType):
    """Where a command writes a file (or, with ``directory``, a folder), checked when the command line is read: a
    path it cannot write is a one-line error before the work, not a traceback after minutes of it."""

    name = "path"

    def __init__(self, directory: bool = False, dash_is_stdout: bool = False) -> None:
        self.directory, self.dash_is_stdout = directory, dash_is_stdout

    def convert(self, value, param, ctx) -> Path:
        if self.dash_is_stdout and str(value) == "-":
            return Path("-")
        why = unwritable(value, self.directory)
        if why:
            raise DistreeError(f"{param.opts[-1] if param else 'output'} {value}: {why}")
        return Path(value)


class FiniteFloat(click.FloatRange):
    """A number option, optionally within a range, that refuses nan and inf: click's FloatRange lets both through
    (nan compares false to every bound), and a nan rate or timeout would run on to a traceback or a silent hang."""

    name = "float"

    def _describe_range(self) -> str:
        return super()._describe_range() if (self.min, self.max) != (None, None) else ""    # help: no "[x<=None]"

    def convert(self, value, param, ctx) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


NUMBER = FiniteFloat()
POSITIVE = FiniteFloat(0, min_open=True)
NON_NEGATIVE = FiniteFloat(0)
OUTPUT_FILE = OutputPath()
OUTPUT_FILE_OR_STDOUT = OutputPath(dash_is_stdout=True)     # "-": standard output
OUTPUT_DIR = OutputPath(directory=True)

TRAFFIC_OPTION = click.option(
    "--traffic", type=click.Choice(["sporadic", "steady"]), default="sporadic", show_default=True,
    help="What a hop between devices costs: sporadic, a request that finds the pipeline idle (a camera's frames; "
         "gRPC's threads asleep at both ends, its profile's rpc:idle round trip); steady, requests back to back "
         "(its rpc round trip).")

DEADLINE_OPTION = click.option("--deadline-ms", type=NUMBER, default=None,
                               help="Latency bound for the path where no exit is taken.")
MIN_THROUGHPUT_OPTION = click.option(
    "--min-throughput", type=NUMBER, default=None,
    help="Requests/s the pipeline must sustain (each stage's expected busy time <= 1/rate).")


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name].split(":")
        try:
            return getattr(import_module(module), attribute)
        except ModuleNotFoundError as exc:
            package = _missing_package(exc)
            if package is None:
                raise
            error = missing_package_error(name, package)

            def refuse(**_) -> None:
                raise error
            return click.Command(name, help=f"(needs distree[{BUILD_EXTRA}]: {package} is missing)",
                                 callback=refuse, context_settings={"ignore_unknown_options": True,
                                                                    "allow_extra_args": True})

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (DistreeError, ModuleNotFoundError) as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            if isinstance(exc, ModuleNotFoundError):
                package = _missing_package(exc)
                if package is None:
                    raise
                exc = missing_package_error(ctx.invoked_subcommand or "", package)
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            if not exc.args or (ctx.obj and ctx.obj.get("debug")):
                raise               # click says "Aborted!"
            click.echo(f"\nstopped: {exc.args[0]}", err=True)      # work that a rerun resumes (the profiler's)
            ctx.exit(STOPPED_EXIT_CODE)


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
