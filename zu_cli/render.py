"""Rendering of command results: rich tables on stderr, or one JSON document on stdout.

``zu verify``'s report (tables, verdict line, JUnit) is ``render_verify``."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.table import Table

from .console import Output
from .manifest import ENVELOPE, SIGNATURE


def unlearn_json(res) -> dict[str, Any]:
    """The ``zu unlearn --json`` document of an UnlearnResult (docs/cli.md)."""
    return {"out": str(res.out), "receipt": str(res.receipt), "variant": res.variant,
            "layers": res.layers, "layers_chosen_by": res.layers_how, "updates": res.updates,
            "requests": res.requests, "counts": res.counts, "from_calibration": res.calibrated,
            "timings_s": res.timings}


def render_unlearn(res, out: Output) -> None:
    """Show an UnlearnResult: one row per request with its status, the counts, where things went."""
    if out.json_mode:
        out.emit_json(unlearn_json(res))
        return
    table = Table(title=f"zu unlearn -> {res.out}")
    for col in ("request", "status", "target rank", "neutral rank"):
        table.add_column(col)
    style = {"forgotten": "green", "still recalled": "red"}
    for r in res.requests:
        st = r["status"]
        table.add_row(r["tag"], f"[{style[st]}]{st}[/{style[st]}]" if st in style else f"[yellow]{st}[/yellow]",
                      str(r["target_rank_after"]), str(r["neutral_rank_after"]))
    out.err.print(table)
    for u in res.updates:
        out.err.print(f"  {u['name']}: ||dW||/||W|| = {u['rel_change']:.4f}")
    c = res.counts
    known = c["total"] - c["not_recalled_before"]
    line = f"[bold]{c['forgotten']}/{known} forgotten[/bold]"
    if c["not_recalled_before"]:
        line += (f" ({c['not_recalled_before']} of {c['total']} not recalled before the edit: nothing to forget, "
                 "not counted)")
    out.err.print(f"{line}; layers {res.layers} ({res.layers_how}); manifest in {res.out}/zu-manifest.json; "
                  f"receipt {res.receipt}")
    if res.calibrated:
        out.err.print(f"settings from this model's calibration (zu calibrate): {', '.join(res.calibrated)}; "
                      "set them in --config to override")
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
    out.err.print(f"forgotten {res.forgotten}/{res.n_forget}; other facts kept {res.kept}/{res.n_keep} ({min(len(res.rows) - res.n_forget, res.n_keep)} shown); "
                  f"model {res.model_dir} ({'cached' if res.cached else f'trained in {res.train_seconds:.0f}s'})")


def render_manifest(stmt: dict[str, Any], out: Output) -> None:
    """A readable summary of a manifest statement."""
    if out.json_mode:
        out.emit_json(stmt)
        return
    p = stmt.get("predicate", {})
    e, signer = p.get("edit", {}), p.get("signer", {})
    out.err.print(f"[bold]zu edit manifest[/bold] ({stmt.get('predicateType')}) - not verified here; "
                  "run `zu verify --model DIR` to check it")
    out.err.print(f"signer: {signer.get('algorithm')} key {signer.get('keyid')} "
                  f"({SIGNATURE if signer.get('format') == 'model-signing' else ENVELOPE})")
    parent = p.get("lineage", {}).get("parent")
    if parent:
        out.err.print(f"history: edit {p['lineage']['depth']} of a chain; parent manifest {parent['manifest_sha256'][:16]}… "
                      f"signed by {str(parent['keyid'])[:16]}…, {parent['requests']} requests ({parent['history']}; "
                      "`zu log` lists the chain)")
    out.err.print(f"source: {p.get('source', {}).get('path_name')} ({len(p.get('source', {}).get('files', {}))} files)")
    out.err.print("versions: " + ", ".join(f"{k} {v}" for k, v in p.get("versions", {}).items()))
    out.err.print(f"edit: {e.get('variant')} on layers {e.get('layers')} ({e.get('layers_chosen_by')}), "
                  f"neutral {e.get('neutral')}, seed {e.get('seed')}, statistics from "
                  f"{e.get('stats_corpus', {}).get('source')} ({str(e.get('stats_corpus', {}).get('digest'))[:16]}…)")
    out.err.print("edited tensors:")
    for t in p.get("tensors", []):
        out.err.print(f"  {t['name']}  {'x'.join(map(str, t['shape']))} {t['dtype']}  "
                      f"||dW||/||W|| {t['rel_change']:.4g}  sha256 {t['sha256_after'][:16]}…")
    r, pr = p.get("requests", {}), p.get("probes", {})
    out.err.print(f"requests: {r.get('count')} (salted commitments{'; plaintext included' if 'plaintext' in r else ''})")
    out.err.print("probes at edit time: " + probe_summary(pr))
    out.err.print(f"files: {len(stmt.get('subject', []))} listed with sha256")


def probe_summary(pr: dict[str, Any]) -> str:
    """The manifest's probe counts in words; a request the model did not recall before is not 'forgotten'.

    Manifests written before the per-request status have only recalled_before / recalled_after.
    """
    total = pr.get("total")
    if "forgotten" in pr:
        known = total - pr["not_recalled_before"]
        text = f"{pr['forgotten']}/{known} forgotten, {pr['still_recalled']} still recalled"
        if pr["not_recalled_before"]:
            text += f", {pr['not_recalled_before']} not recalled before the edit"
    else:
        text = f"recalled before {pr.get('recalled_before')}/{total}, after {pr.get('recalled_after')}/{total}"
    return text + f"; neutral target top-1 after the edit {pr.get('neutral_top1_after')}/{total}"


def render_prove(rows: list[dict[str, Any]], out: Output) -> None:
    """Membership of each request in the edit."""
    if out.json_mode:
        out.emit_json({"requests": rows, "all_included": all(r["in_manifest"] for r in rows)})
        return
    for r in rows:
        out.err.print(f"{r['tag']}: {'[green]part of this edit[/green]' if r['in_manifest'] else '[red]NOT part of this edit[/red]'}")


def check_plot() -> None:
    """Raise a clear usage error when matplotlib (the ``plot`` extra) is missing."""
    import importlib.util

    from .errors import UsageError

    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib, which is not installed", hint="pip install 'zu-cli[plot]'")


def render_locate(scores, cached: bool, out: Output, plot: Path | None = None) -> None:
    """Per-layer indirect effects as a table with bars (or JSON); optional PNG heatmap.

    When tracing found no causal effect it says so, and suggests no window.
    """
    if plot is not None:
        write_plot(scores, plot)
    doc = {"layers": scores.layers, "effect": scores.effect, "recovered": scores.recovered,
           "window": scores.window, "found": scores.found, "reason": scores.reason, "noise_std": scores.noise_std,
           "cached": cached, "requests": scores.requests}
    if out.json_mode:
        out.emit_json(doc)
        return
    for q in scores.requests:
        if not q["recalled"]:
            out.warn(f"{q['tag']}: not recalled (its answer is not the model's top prediction): not traced")
    if not scores.found:
        out.err.print(f"[yellow]no causal effect found[/yellow]: {scores.reason}; no window suggested "
                      f"({len(scores.traced)} of {len(scores.requests)} requests traced{', cached' if cached else ''})")
        return
    top = max(max(scores.effect), 1e-9)
    table = Table(title="causal tracing: mean indirect effect of restoring each layer")
    for col in ("layer", "effect", "recovered", ""):
        table.add_column(col)
    for l, (e, r) in enumerate(zip(scores.effect, scores.recovered)):
        bar = "█" * max(0, round(30 * e / top))
        style = "bold green" if l in scores.window else ""
        table.add_row(str(l), f"{e:.4f}", f"{100 * r:.0f}%", f"[{style}]{bar}[/{style}]" if style else bar)
    out.err.print(table)
    out.err.print(f"suggested window: layers {scores.window} ({len(scores.traced)} of {len(scores.requests)} requests "
                  f"traced{', cached' if cached else ''}); use it with `zu unlearn --layers "
                  f"{scores.window[0]}-{scores.window[-1]}` or `--layers auto`")


def write_plot(scores, path: Path) -> None:
    """PNG heatmap: requests x layers of the indirect effect, and the mean."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    rows = [q["effect"] for q in scores.requests] + [scores.effect]
    labels = [q["tag"] for q in scores.requests] + ["mean"]
    fig, ax = plt.subplots(figsize=(max(6, scores.layers * 0.3), 1 + 0.3 * len(rows)))
    im = ax.imshow(rows, aspect="auto", cmap="Purples")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title(f"indirect effect (suggested window {scores.window})")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_profile(prof, cached: bool, out: Output) -> None:
    """A calibration profile: what was chosen, and every candidate's figures."""
    if out.json_mode:
        out.emit_json({**asdict(prof), "cached": cached})
        return
    f = prof.figures
    out.err.print(f"[bold]calibration profile[/bold] ({'cached' if cached else f'{prof.seconds:.0f}s'}): closed form "
                  f"layers {prof.layers} ({prof.sensitive} sensitive vectors); --multi layers {prof.multi_layers}"
                  + (f", {prof.multi}" if prof.multi else " (its weights are calibrated on first use)"))
    out.err.print(f"probe facts the model knows: {f.get('known_facts')}; edited per candidate: "
                  f"{len(f.get('edit_facts', []))}; neighbours: {f.get('neighbours')}")
    tr = f.get("tracing") or {}
    if tr:
        out.err.print(f"causal tracing: window {tr.get('window') or 'none (no effect found)'}")
    table = Table(title="candidates (on the model's own probe facts)")
    for col in ("layers", "setting", "forgotten", "paraphrases", "neighbours", "perplexity", "chosen"):
        table.add_column(col)
    for c in f.get("candidates", []) + f.get("multi_candidates", []):
        setting = c.get("sensitive") or f"--multi, general {c.get('multi_general_weight'):g}"
        chosen = (c["layers"] == prof.layers and c.get("sensitive") == prof.sensitive) or (
            prof.multi and c.get("multi_general_weight") == prof.multi.get("multi_general_weight"))
        if "error" in c:
            table.add_row(f"{c['layers'][0]}-{c['layers'][-1]}", setting, c["error"], "", "", "", "")
            continue
        table.add_row(f"{c['layers'][0]}-{c['layers'][-1]}", setting, f"{c['forgotten']:.0%}",
                      f"{c['paraphrases']:.0%}", f"{c['neighbours']:.0%}", f"x{c['ppl']:.3f}", "*" if chosen else "")
    out.err.print(table)


def render_log(links: list, problems: list[str], out: Output) -> None:
    """``zu log``: the chain of signed edits, newest first, one line each (no request text exists to show)."""
    rows = [link.summary() for link in links]
    if out.json_mode:
        out.emit_json({"links": rows, "problems": problems})
        return
    for r in rows:
        n = r["requests"]
        out.err.print(f"link {r['link']}  {r['created'] or '(no date)'}  {r['variant']}  layers "
                      f"{','.join(map(str, r['layers'] or []))}  {n} request{'s' if n != 1 else ''}"
                      f"{' (rebased: one edit of the original)' if r.get('rebased') else ''}  key "
                      f"{(r['keyid'] or '?')[:16]}…  {'this checkpoint' if r['folder'] == '.' else r['folder']}")
    for p in problems:
        out.err.print(f"[red]x[/red] {p}")
