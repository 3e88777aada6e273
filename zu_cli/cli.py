"""The zu command line: thin commands (parse -> pipeline -> render); ZuError -> exit code.

torch and transformers are imported inside the commands so that ``zu --help`` answers at once.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional

import typer

from . import __version__
from .console import Output
from .errors import EXIT_INTERRUPTED, ZuError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Make a Hugging Face causal LM forget specific facts, and prove what it did.")


def handled(fn: Callable) -> Callable:
    """Turn ZuError into its one-line message, hint and exit code (traceback only with ZU_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ZuError as exc:
            if os.environ.get("ZU_DEBUG"):
                traceback.print_exc()
            sys.stderr.write(f"zu: error: {exc.message}\n")
            if exc.hint:
                sys.stderr.write(f"  hint: {exc.hint}\n")
            raise typer.Exit(exc.exit_code)
        except KeyboardInterrupt:
            sys.stderr.write("zu: interrupted; nothing was written\n")
            raise typer.Exit(EXIT_INTERRUPTED)

    return wrapper


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"zu {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """zu: few-shot knowledge unlearning (ZeroUnlearn) for Hugging Face checkpoints."""


@app.command()
@handled
def unlearn(
    model: Path = typer.Option(..., "--model", help="Input checkpoint directory (never modified)."),
    forget: Path = typer.Option(..., "--forget", help="Forget requests: .jsonl or .yaml (docs/requests.md)."),
    out: Path = typer.Option(..., "--out", help="Output checkpoint directory (written atomically)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Layers to edit, e.g. 17,18,19 (default: the "
                                         "architecture's window)."),
    neutral: str = typer.Option("eos", "--neutral", help="Neutral target: 'eos' or any text."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of hyperparameters (docs/method.md)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for templates, statistics and rounding."),
    stats_corpus: Optional[str] = typer.Option(None, "--stats-corpus", help="Text for the general statistics: "
                                               ".txt, .jsonl or a folder (default: samples from the model)."),
    device_map: str = typer.Option("auto", "--device-map", help="auto, cpu, cuda, balanced or FILE.json."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help='Per-device budget, e.g. "0=20GiB,cpu=60GiB".'),
    offload_dir: Optional[str] = typer.Option(None, "--offload-dir", help="Folder for weights offloaded to disk."),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype: auto, float32, bfloat16, float16."),
    receipt: Optional[Path] = typer.Option(None, "--receipt", help="Where the commitment receipt goes (default: "
                                           "beside --out, never inside it)."),
    include_requests: bool = typer.Option(False, "--manifest-include-requests",
                                          help="Embed the plaintext requests in the manifest."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
    reveal: bool = typer.Option(False, "--reveal", help="Show request targets instead of id + hash."),
) -> None:
    """Edit a checkpoint so that it forgets the requested facts; write it with an edit manifest."""
    from .config import load_config
    from .pipeline import UnlearnOptions, run_unlearn
    from .render import render_unlearn

    output = Output(json_mode=json_out, reveal=reveal)
    hp = load_config(config, seed=seed)
    opts = UnlearnOptions(model=model, forget=forget, out=out, layers=layers, neutral=neutral,
                          stats_corpus=stats_corpus, device_map=device_map, max_memory=max_memory,
                          offload_dir=offload_dir, dtype=dtype, force=force, receipt=receipt,
                          include_requests=include_requests)
    render_unlearn(run_unlearn(opts, hp, output), output)


@app.command()
@handled
def demo(
    facts: int = typer.Option(3, "--facts", help="How many of the synthetic model's facts to forget."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """The embedded default: train (or reuse) a tiny fact model, make it forget a few facts, show before/after."""
    from .demo import run_demo
    from .render import render_demo

    output = Output(json_mode=json_out, reveal=True)  # the demo's facts are fictional: nothing to hide
    render_demo(run_demo(facts, output), output)


def run() -> None:
    """Console-script entry point."""
    app()
