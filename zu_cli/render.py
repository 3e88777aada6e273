"""Rendering of command results: rich tables on stderr, or one JSON document on stdout."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.table import Table

from .console import Output


def render_unlearn(res, out: Output) -> None:
    """Show an UnlearnResult."""
    doc: dict[str, Any] = {"out": str(res.out), "receipt": str(res.receipt), "variant": res.variant,
                           "layers": res.layers, "layers_chosen_by": res.layers_how, "updates": res.updates,
                           "requests": res.requests, "pinned_by_model": res.pinned, "timings_s": res.timings}
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
    if res.pinned:
        out.err.print(f"settings measured for this model (docs/method.md): {', '.join(res.pinned)}; "
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
    out.err.print(f"forgotten {res.forgotten}/{res.n_forget}; other facts kept {res.kept}/{res.n_keep}; "
                  f"model {res.model_dir} ({'cached' if res.cached else f'trained in {res.train_seconds:.0f}s'})")


def render_verify(report, out: Output, junit: Path | None = None) -> None:
    """Show a VerifyReport (table or JSON) and write the JUnit file when asked."""
    if junit is not None:
        write_junit(report, junit)
    if out.json_mode:
        out.emit_json(report.to_json())
        return
    integ = report.integrity
    if integ is not None:
        state = "[green]intact[/green]" if integ.ok else "[red]FAILED[/red]"
        out.err.print(f"integrity: {state}; signer {integ.keyid or '?'}"
                      f"{' (pinned)' if integ.pinned else ''}; {integ.files} files, {integ.tensors} edited tensors "
                      "checked")
        for p in integ.problems:
            out.err.print(f"  [red]x[/red] {p}")
    for w in report.warnings:
        out.warn(w)
    if report.requests or report.retain:
        table = Table(title=f"zu verify {report.model}")
        for col in ("probe", "result", "detail", "rank", "base rank"):
            table.add_column(col)
        for p in report.all_probes():
            res = "[dim]skip[/dim]" if p.passed is None else "[green]pass[/green]" if p.passed else "[red]FAIL[/red]"
            table.add_row(p.name, res, p.detail + (f" | {p.text}" if p.text else ""),
                          "" if p.rank is None else str(p.rank), "" if p.base_rank is None else str(p.base_rank))
        out.err.print(table)
    m = report.metrics
    if m:
        cols = [k for k in ("before", "after") if k in m]
        t = Table(title="% still top-1, perplexity")
        t.add_column("metric")
        for c in cols:
            t.add_column(c)
        for k in ("Eff", "Gen", "Spe", "PPL"):
            t.add_row(k, *[str(m[c][k]) for c in cols])
        out.err.print(t)
    if report.deep:
        d = report.deep
        out.err.print(f"logit lens: targets decodable (rank < {d['k']}) per layer, after: {d['decodable_after']}"
                      + (f"; before: {d['decodable_before']}" if d["decodable_before"] else ""))
    s = report.to_json()["summary"]
    if s["probes"]:
        out.err.print(f"[bold]{s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped[/bold]")


def write_junit(report, path: Path) -> None:
    """JUnit XML, one test case per probe (names carry no sensitive text unless --reveal filled ``text``)."""
    import xml.etree.ElementTree as ET

    probes = report.all_probes()
    integ = report.integrity
    suite = ET.Element("testsuite", name="zu verify", tests=str(len(probes) + (integ is not None)),
                       failures=str(sum(p.passed is False for p in probes) + (integ is not None and not integ.ok)),
                       skipped=str(sum(p.passed is None for p in probes)))
    if integ is not None:
        case = ET.SubElement(suite, "testcase", classname="integrity", name="manifest")
        if not integ.ok:
            ET.SubElement(case, "failure", message=integ.problems[0]).text = "\n".join(integ.problems)
    for p in probes:
        case = ET.SubElement(suite, "testcase", classname=p.kind, name=p.name)
        if p.passed is False:
            ET.SubElement(case, "failure", message=p.detail)
        elif p.passed is None:
            ET.SubElement(case, "skipped", message=p.detail)
        if p.text:
            ET.SubElement(case, "system-out").text = p.text
    tmp = path.with_name(f".{path.name}.tmp")
    ET.ElementTree(suite).write(tmp, encoding="utf-8", xml_declaration=True)
    tmp.replace(path)


def render_manifest(stmt: dict[str, Any], out: Output) -> None:
    """A readable summary of a manifest statement."""
    if out.json_mode:
        out.emit_json(stmt)
        return
    p = stmt.get("predicate", {})
    e, signer = p.get("edit", {}), p.get("signer", {})
    out.err.print(f"[bold]zu edit manifest[/bold] ({stmt.get('predicateType')}) - not verified here; "
                  "run `zu verify --model DIR` to check it")
    out.err.print(f"signer: {signer.get('algorithm')} key {signer.get('keyid')}")
    out.err.print(f"source: {p.get('source', {}).get('path_name')} ({len(p.get('source', {}).get('files', {}))} files)")
    out.err.print("versions: " + ", ".join(f"{k} {v}" for k, v in p.get("versions", {}).items()))
    out.err.print(f"edit: {e.get('variant')} on layers {e.get('layers')} ({e.get('layers_chosen_by')}), "
                  f"neutral {e.get('neutral')}, seed {e.get('seed')}, statistics from "
                  f"{e.get('stats_corpus', {}).get('source')} ({str(e.get('stats_corpus', {}).get('digest'))[:16]}…)")
    out.err.print("edited tensors:")
    for t in p.get("tensors", []):
        out.err.print(f"  {t['name']}  {'x'.join(map(str, t['shape']))} {t['dtype']}  "
                      f"||dW||/||W|| {t['rel_change']:.4g}  sha256 {t['sha256_after'][:16]}…", soft_wrap=True)
    r, pr = p.get("requests", {}), p.get("probes", {})
    out.err.print(f"requests: {r.get('count')} (salted commitments{'; plaintext included' if 'plaintext' in r else ''})"
                  f"; recalled before {pr.get('recalled_before')}, after {pr.get('recalled_after')}, "
                  f"neutral top-1 after {pr.get('neutral_top1_after')}")
    out.err.print(f"files: {len(stmt.get('subject', []))} listed with sha256")


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
    """Per-layer indirect effects as a table with bars (or JSON); optional PNG heatmap."""
    if plot is not None:
        write_plot(scores, plot)
    doc = {"layers": scores.layers, "effect": scores.effect, "recovered": scores.recovered,
           "window": scores.window, "noise_std": scores.noise_std, "cached": cached,
           "requests": scores.requests}
    if out.json_mode:
        out.emit_json(doc)
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
    out.err.print(f"suggested window: layers {scores.window} ({len(scores.requests)} requests traced"
                  f"{', cached' if cached else ''}); use it with `zu unlearn --layers "
                  f"{','.join(map(str, scores.window))}` or `--layers auto`")


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
