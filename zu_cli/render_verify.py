"""Rendering of ``zu verify``: the integrity verdict, the probe and attack tables, the verdict
line, and the JUnit report for CI."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from .console import Output


def render_integrity(integ, out: Output) -> None:
    """The integrity verdict, once, as soon as it is known (before any probe runs)."""
    if out.json_mode:
        return
    if integ.ok:
        out.err.print(f"integrity: [green]intact[/green]; signer {integ.keyid}{' (pinned)' if integ.pinned else ''}; "
                      f"{integ.files} files, {integ.tensors} edited tensors checked"
                      + (f"; history of {integ.links} signed edits checked" if integ.links > 1 else ""))
    else:
        out.err.print(f"integrity: [red]FAILED[/red] ({len(integ.problems)} problem"
                      f"{'s' if len(integ.problems) > 1 else ''})")
        for p in integ.problems:
            out.err.print(f"  [red]x[/red] {p}")
    for w in integ.warnings:
        out.warn(w)


def render_verify(report, out: Output) -> None:
    """Show a VerifyReport's probes and metrics (the integrity verdict was shown by ``render_integrity``)
    and end with one verdict line."""
    if out.json_mode:
        out.emit_json(report.to_json())
        return
    integ_warnings = set(report.integrity.warnings) if report.integrity is not None else set()
    for w in report.warnings:
        if w not in integ_warnings:
            out.warn(w)
    if report.requests or report.retain:
        table = Table(title=f"zu verify {report.model}")
        for col in ("probe", "result", "detail", "rank", "base rank"):
            table.add_column(col)
        # Attack probes are many (requests x formats x wrappers): their table below shows the failures.
        for p in [p for p in report.all_probes() if not p.kind.startswith("attack-") or p.passed is False]:
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
    if report.attack_summary:
        t = Table(title="attacks: forgotten probes recalled again")
        for col in ("attack", "recalled", "of", "%", "priors", "base recalled", "note"):
            t.add_column(col)
        for a in report.attack_summary:
            t.add_row(a["attack"] + ("" if a["judged"] else " (control, not judged)"), str(a["recalled"]),
                      str(a["probed"]), str(a["recalled_pct"]), str(a.get("recalled_prior", "")),
                      "" if a["base_recalled"] is None else str(a["base_recalled"]), a["note"])
        out.err.print(t)
        for hint in attack_hints(report.attack_summary):
            out.err.print(hint)
    if report.deep:
        d = report.deep
        out.err.print(f"logit lens: targets decodable (rank < {d['k']}) per layer, after: {d['decodable_after']}"
                      + (f"; before: {d['decodable_before']}" if d["decodable_before"] else ""))
    out.err.print(verdict_line(report))


def attack_hints(summary: list[dict]) -> list[str]:
    """What to edit with when a judged attack brought facts back (docs/verify.md, "Attacks").

    Args:
        summary: the report's attack summary rows (``attack``, ``recalled``, ``judged``).

    Returns:
        One line per remedy, none when nothing came back.
    """
    back = [a["attack"] for a in summary if a["judged"] and a["recalled"]]
    quant = [a.removeprefix("quant-") for a in back if a.startswith("quant-")]
    hints = []
    if quant:
        hints.append(f'hint: facts came back under {", ".join(quant)}: edit again with quant_keys: "{",".join(quant)}" '
                     "in --config (docs/method.md, \"Forgetting that survives quantisation\")")
    if "relearn" in back:
        hints.append("hint: facts came back after fine-tuning: edit again with z_answer: 20 in --config "
                     "(docs/method.md, \"When to change what\")")
    return hints


def verdict_line(report) -> str:
    """The last line of ``zu verify``: what passed, what failed, the exit code."""
    s = report.to_json()["summary"]
    code = report.exit_code
    if code == 4:
        return "[bold red]verify: FAILED[/bold red] integrity (exit 4); no probe ran"
    known = [r for r in report.requests if r["status"] != "not recalled before the edit"]
    gone = sum(r["status"] == "forgotten" for r in known)
    parts = [f"{gone}/{len(known)} requests forgotten"] if report.requests else []
    if len(known) < len(report.requests):
        parts.append(f"{len(report.requests) - len(known)} not recalled before the edit (skipped)")
    if s["probes"]:
        parts.append(f"{s['passed']} probes passed, {s['failed']} failed, {s['skipped']} skipped")
    priors = sum(p.passed is False and p.prior is True for p in report.all_probes())
    if priors:
        parts.append(f"{priors} of the failures also answered for invented subjects (priors, docs/verify.md)")
    head = "[bold green]verify: ok[/bold green]" if code == 0 else "[bold red]verify: FAILED[/bold red]"
    return f"{head} (exit {code}): " + ("; ".join(parts) or "integrity only")


def write_junit(report, path: Path) -> None:
    """JUnit XML, one test case per probe (names carry no sensitive text unless --reveal filled ``text``).

    Raises:
        OutputError: the file (or its folder) cannot be written (exit 6, never a probe failure).
    """
    import xml.etree.ElementTree as ET

    from .errors import OutputError

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
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        ET.ElementTree(suite).write(tmp, encoding="utf-8", xml_declaration=True)
        tmp.replace(path)
    except OSError as exc:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        raise OutputError(f"--junit {path}: cannot write the report ({exc.strerror or exc})",
                          hint="the probes ran; choose a writable path") from exc
