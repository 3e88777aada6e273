"""Rendering of command results: rich tables on stderr, or one JSON document on stdout."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from rich.table import Table

from .console import Output


def render_unlearn(res, out: Output) -> None:
    """Show an UnlearnResult."""
    doc: dict[str, Any] = {"out": str(res.out), "receipt": str(res.receipt), "layers": res.layers,
                           "layers_chosen_by": res.layers_how, "updates": res.updates, "requests": res.requests,
                           "timings_s": res.timings}
    if out.json_mode:
        out.emit_json(doc)
        return
    table = Table(title=f"zu unlearn -> {res.out}")
    for col in ("request", "recalled before", "recalled after", "target rank", "neutral rank"):
        table.add_column(col)
    for r in res.requests:
        table.add_row(r["tag"], str(r["recalled_before"]), str(r["recalled_after"]), str(r["target_rank_after"]),
                      str(r["neutral_rank_after"]))
    out.err.print(table)
    for u in res.updates:
        out.err.print(f"  {u['name']}: ||dW||/||W|| = {u['rel_change']:.4f}")
    forgotten = sum(not r["recalled_after"] for r in res.requests)
    out.err.print(f"[bold]{forgotten}/{len(res.requests)} forgotten[/bold]; layers {res.layers} "
                  f"({res.layers_how}); manifest in {res.out}/zu-manifest.json; receipt {res.receipt}")
    out.err.print("timings (s): " + ", ".join(f"{k} {v}" for k, v in res.timings.items()))


def render_demo(res, out: Output) -> None:
    """Show a DemoResult: what the model answers before and after."""
    if out.json_mode:
        out.emit_json(asdict(res))
        return
    table = Table(title="zu demo: synthetic fact model")
    for col in ("prompt", "fact", "before", "after", "status"):
        table.add_column(col)
    for row in res.rows:
        same = row["after"] == row["target"]
        if row["forget"]:
            status = "[red]still recalled[/red]" if same else "[green]forgotten[/green]"
        else:
            status = "[green]kept[/green]" if same else "[red]lost[/red]"
        table.add_row(row["prompt"], row["target"], row["before"], row["after"], status)
    out.err.print(table)
    out.err.print(f"forgotten {res.forgotten}/{res.n_forget}; other facts kept {res.kept}/{res.n_keep}; "
                  f"model {res.model_dir} ({'cached' if res.cached else f'trained in {res.train_seconds:.0f}s'})")
