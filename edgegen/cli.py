"""The `edgegen` command line. Heavy imports happen inside commands: `edgegen run` never loads torch."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

import typer

from edgegen.runtime.errors import EdgegenError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Gemma 4 speculative decoding on ONNX Runtime: export a pair, run it, measure it.")


@app.callback()
def _root() -> None:
    """Gemma 4 speculative decoding on ONNX Runtime: export a pair, run it, measure it."""


class QuantKind(str, Enum):
    fp32 = "fp32"
    int8 = "int8"
    int4 = "int4"


@app.command()
def export(
    target: str = typer.Option(..., "--target", help="Target model: HF id or local directory (Gemma 4 E2B/E4B)"),
    assistant: str = typer.Option(..., "--assistant", help="Assistant (drafter): HF id or local directory"),
    out: Path = typer.Option(..., "--out", help="Bundle directory to write"),
    quant: QuantKind = typer.Option(QuantKind.fp32, "--quant", help="Target weight precision"),
    assistant_quant: QuantKind | None = typer.Option(
        None, "--assistant-quant", help="Drafter weight precision [default: fp32, or int8 for int8/int4 targets]"),
    block_size: int = typer.Option(32, "--block-size", min=16, max=256, help="Quantization block (input channels)"),
    max_context: int = typer.Option(4096, "--max-context", min=16, help="Longest prompt + generation the bundle holds"),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the parity check against PyTorch"),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists"),
) -> None:
    """Export a target + assistant pair to a verified ONNX bundle."""
    if block_size & (block_size - 1):
        raise EdgegenError(f"--block-size {block_size} is not a power of two; use 16, 32, 64, 128 or 256")
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from edgegen.export.bundle import STAGES, ExportOptions, export_bundle

    opts = ExportOptions(quant.value, assistant_quant.value if assistant_quant else None, block_size, max_context,
                         not no_verify, force)
    with Progress(TextColumn("{task.description:<8}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), transient=False) as progress:
        task = progress.add_task("start", total=len(STAGES))

        def stage(name: str) -> None:
            progress.update(task, description=name, completed=STAGES.index(name))

        manifest = export_bundle(target, assistant, out, opts, stage=stage)
        progress.update(task, description="done", completed=len(STAGES))
    checks = manifest.parity.get("checks", {})
    summary = ", ".join(f"{k} {'ok' if v['passed'] else 'FAILED'}" for k, v in checks.items()) or "not verified"
    typer.echo(f"wrote {out} ({summary})")


def main() -> None:
    """Entry point: user errors are one line on stderr and exit 2; Ctrl-C exits 130 without a traceback."""
    try:
        app()
    except EdgegenError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
