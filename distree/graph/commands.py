"""``distree inspect``: print (or write) the chain of blocks a model splits into."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import click

from distree.cli import OUTPUT_FILE_OR_STDOUT
from distree.graph.chain import Chain
from distree.serde import write_json_atomic


@click.command("inspect")
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(path_type=Path))
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D1,D2,...",
              help="Fix the input's symbolic dims, e.g. input=1,3,32,32 (batch defaults to 1).")
@click.option("--coarsen", "max_blocks", type=int, default=None, metavar="N",
              help="Merge into at most N blocks, keeping the cuts with the smallest activations.")
@click.option("--final-output", default=None, metavar="NAME",
              help="The final classifier's output (default: the first graph output; others are exits).")
@click.option("--json", "json_path", type=OUTPUT_FILE_OR_STDOUT, default=None, metavar="PATH",
              help="Also write the chain as JSON to PATH ('-' for stdout, instead of the table).")
def inspect_cmd(model_path: Path, input_shapes: tuple[str, ...], max_blocks: int | None, final_output: str | None,
                json_path: Path | None) -> None:
    """Show the chain of blocks MODEL.onnx splits into: ops, FLOPs, parameters, and the cut tensors."""
    from distree.graph.cuts import build_chain, exit_attachments      # ONNX: loaded when the command runs
    from distree.graph.load import load_model, parse_shape_option
    from distree.graph.segment import coarsen

    _notes_to_stderr()
    shapes = dict(parse_shape_option(s) for s in input_shapes)
    model = load_model(model_path, shapes)
    chain = build_chain(model, final_output)
    if max_blocks is not None:
        chain = coarsen(chain, max_blocks, keep=_exit_cuts(chain, exit_attachments(model, chain)))
    exits = exit_attachments(model, chain)
    doc = {"schema_version": 1, "kind": "Chain", **chain.to_dict(), "exit_attachments": exits}
    if json_path is not None and str(json_path) == "-":
        click.echo(json.dumps(doc, indent=2))
        return
    if json_path is not None:
        write_json_atomic(json_path, doc)
    _print_table(chain, exits, model_path)


def _exit_cuts(chain: Chain, attachments: dict[str, int]) -> list[str]:
    """Cut tensors where the model's exits attach: coarsening keeps them."""
    return [chain.blocks[k].output for k in attachments.values() if 0 <= k < len(chain.blocks)]


class _NoteHandler(logging.Handler):
    """Print library notes (e.g. "batch set to 1") on stderr, through click so tests capture them."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(record.getMessage(), err=True)


def _notes_to_stderr() -> None:
    log = logging.getLogger("distree.graph")
    if not any(isinstance(h, _NoteHandler) for h in log.handlers):
        log.addHandler(_NoteHandler())
        log.propagate = False


def _print_table(chain: Chain, exits: dict[str, int], model_path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 140))
    shape = "x".join(map(str, chain.input_shape))
    attached = ", ".join(f"{name} after block {k}" for name, k in exits.items())
    console.print(
        f"[bold]{model_path.name}[/]: input {chain.input_name} {shape} {chain.input_dtype}, "
        f"output {chain.output_name}, {len(chain.blocks)} blocks" + (f"; exits: {attached}" if exits else "")
    )
    columns = [("block", "right"), ("ops", "left"), ("FLOPs", "right"), ("params", "right"),
               ("output", "left"), ("shape", "left"), ("bytes", "right")] + ([("exits", "left")] if exits else [])
    table = Table(show_edge=False, pad_edge=False)
    for col, justify in columns:
        table.add_column(col, justify=justify, overflow="fold")
    by_block: dict[int, list[str]] = {}
    for name, k in exits.items():
        by_block.setdefault(k, []).append(name)
    for b in chain.blocks:
        row = [str(b.index), _ops_summary(b.ops), _si(b.flops), _bytes(b.param_bytes), b.output,
               "x".join(map(str, b.output_shape)), _bytes(b.out_bytes)]
        table.add_row(*row, *([",".join(by_block.get(b.index, []))] if exits else []))
    table.add_section()
    total = ["total", f"{sum(len(b.ops) for b in chain.blocks)} ops", _si(sum(b.flops for b in chain.blocks)),
             _bytes(sum(b.param_bytes for b in chain.blocks))]
    table.add_row(*total, *[""] * (len(columns) - len(total)))
    console.print(table)


def _ops_summary(ops: tuple[str, ...]) -> str:
    counts = Counter(ops)
    return " ".join(f"{op}x{n}" if n > 1 else op for op, n in counts.items())


def _si(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n}B"
