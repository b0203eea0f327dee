"""``distree exits`` (find or train exit heads) and ``distree calibrate`` (measure them).

The ONNX machinery is imported inside the commands: listing them (``distree --help``) need not load it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from distree.cli import NUMBER, OUTPUT_FILE
from distree.errors import DistreeError
from distree.exits.types import DEFAULT_CONFIDENCE, DEFAULT_LEVELS, HEAD_KINDS, SCORE_KINDS, Calibration

if TYPE_CHECKING:
    from distree.exits.report import ExitReport

_MODEL = click.Path(path_type=Path, dir_okay=False)


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _blocks(text: str | None) -> list[int] | None:
    if text is None or text.strip() == "all":
        return None
    try:
        blocks = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        blocks = []
    if not blocks:                  # an empty --at would write a model with no exits at all
        raise DistreeError(f"--at {text!r}: expected block indices like 2,5,8 (see `distree inspect`) or 'all'")
    return blocks


@click.command("exits")
@click.argument("model_path", metavar="MODEL.onnx", type=_MODEL)
@click.option("--data", "data_path", required=True, type=_MODEL, help="Calibration .npz: x float32 NCHW, y int64.")
@click.option("--at", "at_text", default=None, metavar="B1,B2,...|all",
              help="Train exits after these blocks (default: every block, unless the model declares exits).")
@click.option("--exit-outputs", "exit_outputs", default=None, metavar="A,B,...",
              help="Extra graph outputs that are exits (default: outputs whose name starts with 'exit').")
@click.option("--fit-fraction", default=0.5, show_default=True, help="Share of --data the heads are fit on.")
@click.option("--seed", default=0, show_default=True, help="Seed of the fit/threshold split.")
@click.option("--head", type=click.Choice(HEAD_KINDS), default="auto", show_default=True,
              help="linear: global pool + linear; conv: 4x4 pool + 1x1 conv + linear; auto: conv on maps >= 8x8.")
@click.option("-o", "--output", required=True, type=OUTPUT_FILE, help="Write the multi-exit model here.")
def exits_cmd(model_path: Path, data_path: Path, at_text: str | None, exit_outputs: str | None,
              fit_fraction: float, seed: int, head: str, output: Path) -> None:
    """Find MODEL's exits or train light exit heads on its frozen features, and attach them.

    Each exit also gets an entry head on its block's input, which the `stability` score compares with.
    """
    import onnx
    from rich.console import Console
    from rich.table import Table

    from distree.exits.data import load_dataset
    from distree.exits.declared import declared_exits
    from distree.exits.heads import headless_notes, num_classes, train_exits
    from distree.graph import build_chain, load_model
    from distree.serde import write_bytes_atomic

    model = load_model(model_path)
    chain = build_chain(model)
    data = load_dataset(data_path, chain.input_shape, num_classes(model, chain))
    names = _names(exit_outputs)
    at = _blocks(at_text)
    declared = declared_exits(model, chain, names) if names is not None or at is None else ()
    exits_model, exits = train_exits(model, chain, data, at=at, seed=seed, fit_fraction=fit_fraction,
                                     declared=declared, head=head, attach_to=onnx.load(model_path))
    write_bytes_atomic(output, exits_model.SerializeToString())
    table = Table(title=f"{len(exits)} exit(s) -> {output}")
    for col in ("exit", "after block", "source", "head MFLOPs", "entry head", "fit acc"):
        table.add_column(col, justify="left" if col in ("exit", "source", "entry head") else "right")
    for e in exits:
        table.add_row(e.name, str(e.after_block), e.source, f"{e.flops / 1e6:.4f}", e.entry_output or "-",
                      "-" if e.fit_accuracy is None else f"{e.fit_accuracy:.3f}")
    Console().print(table)
    if at is None and not declared:             # every candidate was asked for: say why the others are none
        for line in headless_notes(model, chain):
            click.echo(f"note: {line}", err=True)


@click.command("calibrate")
@click.argument("model_path", metavar="MODEL.onnx", type=_MODEL)
@click.option("--data", "data_path", required=True, type=_MODEL, help="Calibration .npz (same as `distree exits`).")
@click.option("--score", "score_kind", type=click.Choice(SCORE_KINDS), default="max_softmax", show_default=True)
@click.option("--exit-outputs", "exit_outputs", default=None, metavar="A,B,...",
              help="Exits to calibrate (default: those `distree exits` recorded, else outputs named exit*).")
@click.option("--levels", default=DEFAULT_LEVELS, show_default=True, help="Threshold levels per exit.")
@click.option("--fit-fraction", type=NUMBER, default=None,
              help="As given to `distree exits` (default: what it recorded in the model, else 0.5).")
@click.option("--seed", type=int, default=None, help="As given to `distree exits` (default: as recorded, else 0).")
@click.option("--report", is_flag=True, help="Print per-exit accuracy and exit-rate curves.")
@click.option("--test", "test_path", type=_MODEL, default=None, help="Test .npz, used only in the report / plot.")
@click.option("--confidence", default=DEFAULT_CONFIDENCE, show_default=True, help="Of the accuracy lower bounds.")
@click.option("--plot", "plot_path", type=OUTPUT_FILE, default=None,
              help="Draw the curves to this PNG.")
@click.option("-o", "--output", type=OUTPUT_FILE, default=None, help="Write the Calibration JSON here.")
def calibrate_cmd(model_path: Path, data_path: Path, score_kind: str, exit_outputs: str | None, levels: int,
                  fit_fraction: float | None, seed: int | None, report: bool, test_path: Path | None, confidence: float,
                  plot_path: Path | None, output: Path | None) -> None:
    """Measure every exit of MODEL on the threshold split of --data: scores, correctness, threshold grid."""
    if output is None and not report and plot_path is None:
        raise DistreeError("nothing to do: give -o calibration.json, --report and/or --plot curves.png")
    from distree.exits.calibrate import calibrate, run_exits
    from distree.exits.data import load_dataset
    from distree.exits.declared import declared_exits
    from distree.exits.heads import fit_split_metadata, num_classes
    from distree.exits.report import exit_reports, plot_curves
    from distree.graph import build_chain, load_model

    model = load_model(model_path)
    chain = build_chain(model)
    k = num_classes(model, chain)
    data = load_dataset(data_path, chain.input_shape, k)
    test = load_dataset(test_path, chain.input_shape, k) if test_path else None
    exits = declared_exits(model, chain, _names(exit_outputs))
    if not exits:
        raise DistreeError(f"{model_path} has no exits; attach some with `distree exits {model_path} --data "
                           f"{data_path} -o model_exits.onnx` and calibrate that model")
    recorded = fit_split_metadata(model)
    seed = seed if seed is not None else recorded.seed if recorded else 0
    fit_fraction = fit_fraction if fit_fraction is not None else recorded.fit_fraction if recorded else 0.5
    cal = calibrate(model, chain, exits, data, score_kind, seed=seed, fit_fraction=fit_fraction, levels=levels,
                    test_size=len(test) if test is not None else 0)
    if output is not None:
        cal.save(output)
    if report or plot_path is not None:
        behaviour = run_exits(model, chain, exits, test, score_kind) if test is not None else None
        reports = exit_reports(cal, behaviour, confidence)
        if report:
            _print_report(cal, reports, behaviour.correct[:, -1].mean() if behaviour else None, confidence)
        if plot_path is not None:
            plot_curves(cal, reports, plot_path)
            click.echo(f"wrote {plot_path}", err=True)


def _print_report(cal: Calibration, reports: tuple[ExitReport, ...], test_final: float | None,
                  confidence: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    sizes = ", ".join(f"{k} {v}" for k, v in cal.split_sizes.items())
    test_text = "" if test_final is None else f", test {test_final:.4f}"
    console.print(f"score {cal.score_kind}; samples: {sizes}; final classifier accuracy: calibration "
                  f"{cal.final_accuracy():.4f}{test_text}")
    for r in reports:
        test_acc = "" if r.test_accuracy is None else f", test {r.test_accuracy:.4f}"
        table = Table(title=f"{r.name} after block {r.after_block}: accuracy on all samples {r.accuracy:.4f}{test_acc}")
        cols = ["level", "threshold", "exit rate", "acc", f"LCB {confidence:.0%}"]
        cols += ["test rate", "test acc"] if r.test_curve else []
        for col in cols:
            table.add_column(col, justify="right")
        for i, p in enumerate(r.curve):
            row = [str(p.level), f"{p.threshold:.4g}", f"{p.exit_rate:.3f}", f"{p.accuracy:.4f}", f"{p.lcb:.4f}"]
            if r.test_curve:
                t = r.test_curve[i]
                row += [f"{t.exit_rate:.3f}", f"{t.accuracy:.4f}"]
            table.add_row(*row)
        console.print(table)
