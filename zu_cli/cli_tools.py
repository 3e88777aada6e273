"""The CLI's commands about models rather than edits: ``zu calibrate``, ``zu demo``, ``zu locate``
(registered on ``cli.app``; cli.py holds ``unlearn``, ``verify`` and the shared options)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from .cli import DEVICE_MAP, DTYPE, JSON_OUT, MODEL, REVEAL, Dtype, command, examples, handled
from .console import Output


@command(summary="Find a model's own edit settings (layers, kind, --multi weights); cached per model.",
         epilog=examples("zu calibrate --model ./ckpt", "zu calibrate --model ./ckpt --multi --json"))
@handled
def calibrate(
    model: str = MODEL,
    multi: bool = typer.Option(False, "--multi", help="Also calibrate --multi (its window and null-space weight)."),
    force: bool = typer.Option(False, "--force", help="Calibrate again even if a profile is cached."),
    device_map: str = DEVICE_MAP,
    dtype: Dtype = DTYPE,
    json_out: bool = JSON_OUT,
) -> None:
    """Calibrate a model: edit zu's common-knowledge probe facts the model knows at candidate
    windows (after causal tracing), score forgetting, paraphrases, neighbours and perplexity, and
    keep the best settings. `zu unlearn` does this by itself the first time it meets a model."""
    from .pipeline_layers import run_calibrate
    from .render import render_profile

    output = Output(json_mode=json_out)
    with output.live():
        prof, cached = run_calibrate(model, multi, force, device_map, dtype, output)
    render_profile(prof, cached, output)


@command(summary="The embedded default: a tiny fact model forgets three facts, before/after shown.",
         epilog=examples("zu demo", "zu demo --facts 2 --json"))
@handled
def demo(
    facts: int = typer.Option(3, "--facts", min=1, max=10, help="How many of the synthetic model's facts to forget."),
    json_out: bool = JSON_OUT,
) -> None:
    """The embedded default: train (once, then cached) a tiny Llama on fictional facts, make it forget
    a few of them with zu's pipeline, and show what it answers before and after."""
    from .demo import run_demo
    from .render import render_demo

    output = Output(json_mode=json_out, reveal=True)  # the demo's facts are fictional: nothing to hide
    with output.live():
        res = run_demo(facts, output)
    render_demo(res, output)


@command(summary="Causal tracing: which layers recall the facts, and the window to edit.",
         epilog=examples("zu locate --model ./ckpt --forget forget.jsonl",
                         "zu locate --model ./ckpt --forget forget.jsonl --num-layers 5 --plot trace.png"))
@handled
def locate(
    model: str = MODEL,
    forget: Path = typer.Option(..., "--forget", metavar="FILE", help="Requests (with subjects) whose facts to "
                                "locate."),
    num_layers: int = typer.Option(3, "--num-layers", min=1, help="Width of the suggested window."),
    samples: int = typer.Option(5, "--samples", min=1, help="Noise samples per request."),
    window: int = typer.Option(1, "--window", min=1, help="Layers restored together around each scored layer."),
    kind: Literal["mlp", "hidden"] = typer.Option("mlp", "--kind", help="What is restored: the MLP output at the "
                                                  "subject's last token, or the residual stream entering the layer."),
    seed: int = typer.Option(0, "--seed", help="Noise seed."),
    plot: Optional[Path] = typer.Option(None, "--plot", metavar="FILE.png", help="Write a heatmap (needs the "
                                        "zu-cli[plot] extra)."),
    device_map: str = DEVICE_MAP,
    dtype: Dtype = DTYPE,
    json_out: bool = JSON_OUT,
    reveal: bool = REVEAL,
) -> None:
    """Causal tracing (ROME): corrupt the subject, restore one layer at a time, and measure how much of
    the answer comes back; suggest the window `--layers auto` would edit."""
    from .locate import TraceSettings
    from .pipeline_layers import LocateOptions, run_locate
    from .render import check_plot, render_locate

    if plot is not None:
        check_plot()  # fail before the tracing, not after
    output = Output(json_mode=json_out, reveal=reveal)
    st = TraceSettings(samples=samples, window=window, kind=kind, seed=seed)
    with output.live():
        scores, cached = run_locate(LocateOptions(model=model, forget=forget, num_layers=num_layers, settings=st,
                                                  device_map=device_map, dtype=dtype), output)
    render_locate(scores, cached, output, plot)
