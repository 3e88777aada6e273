"""The CLI's commands about keys and records: ``zu keygen``, ``zu manifest show|prove``, ``zu log``
(registered on ``cli.app``; cli.py holds the pipeline commands and the shared options)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from .cli import CONTEXT, JSON_OUT, REVEAL, app, command, examples, handled
from .console import Output


@command(summary="Create the key pair that signs zu's edit manifests.",
         epilog=examples("zu keygen", "zu keygen --out keys/ --type ed25519"))
@handled
def keygen(
    out: Optional[Path] = typer.Option(None, "--out", metavar="DIR", help="Directory for zu-signing.key / .pub "
                                       "(default: $ZU_CONFIG_DIR, else ~/.config/zu)."),
    kind: Literal["ecdsa-p256", "ed25519"] = typer.Option(
        "ecdsa-p256", "--type", help="Key type: ecdsa-p256 signs with model-signing (model.sig, verifiable by "
                                     "`model_signing verify key`); ed25519 signs zu's own DSSE envelope."),
    force: bool = typer.Option(False, "--force", help="Replace an existing key pair."),
    json_out: bool = JSON_OUT,
) -> None:
    """Create the signing key pair that `zu unlearn` signs manifests with."""
    from .keys import keygen as make_key

    output = Output(json_mode=json_out)
    priv, pub, fp = make_key(out, kind, force)
    if json_out:
        output.emit_json({"private_key": str(priv), "public_key": str(pub), "fingerprint": fp, "type": kind})
    else:
        output.err.print(f"private key {priv} (mode 0600; keep it secret)\npublic key  {pub} (publish it; pin it "
                         f"with `zu verify --public-key`)\nfingerprint {fp}")


manifest_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, context_settings=CONTEXT,
                           help="Read a checkpoint's edit manifest; prove what a receipt says.")
app.add_typer(manifest_app, name="manifest", short_help="Read a checkpoint's edit manifest; prove what a receipt "
              "says.")


@command("show", summary="A readable summary of the manifest (not verified).", parent=manifest_app,
         epilog=examples("zu manifest show ./ckpt-clean", "zu manifest show ./ckpt-clean --json"))
@handled
def manifest_show(
    model: Path = typer.Argument(..., metavar="DIR", help="Checkpoint directory written by `zu unlearn`."),
    json_out: bool = typer.Option(False, "--json", help="Print the statement as JSON on stdout."),
) -> None:
    """A readable summary of the manifest (it is not verified: `zu verify` does that)."""
    from .integrity import read_manifest
    from .render import render_manifest

    render_manifest(read_manifest(model), Output(json_mode=json_out))


@command("prove", summary="Which requests were part of the edit, from the operator's receipt.",
         parent=manifest_app,
         epilog=examples("zu manifest prove ./ckpt-clean --receipt ckpt-clean.zu-receipt.json --forget probes.jsonl"))
@handled
def manifest_prove(
    model: Path = typer.Argument(..., metavar="DIR", help="Checkpoint directory written by `zu unlearn`."),
    receipt: Path = typer.Option(..., "--receipt", metavar="FILE", help="The receipt `zu unlearn` wrote beside "
                                 "--out."),
    forget: Path = typer.Option(..., "--forget", metavar="FILE", help="Requests to test for membership (.jsonl or "
                                ".yaml); paraphrases and neighbours do not matter."),
    json_out: bool = JSON_OUT,
    reveal: bool = REVEAL,
) -> None:
    """Say which requests were part of the edit: exit 0 when all were, 1 when any was not, 4 when the
    receipt or the manifest does not check out."""
    from .pipeline_verify import run_prove
    from .render import render_prove

    output = Output(json_mode=json_out, reveal=reveal)
    rows = run_prove(model, receipt, forget, output)
    render_prove(rows, output)
    if not all(r["in_manifest"] for r in rows):
        raise typer.Exit(1)


@command(summary="The checkpoint's history of signed edits, newest first; exit 4 when a link breaks.",
         epilog=examples("zu log ./ckpt-clean", "zu log ./ckpt-clean --json"))
@handled
def log(
    model: Path = typer.Argument(..., metavar="DIR", help="A checkpoint written by zu unlearn."),
    json_out: bool = JSON_OUT,
) -> None:
    """List every signed edit the checkpoint carries (its own and those under zu-history/): when,
    which variant and layers, how many requests, which key. The links are checked as `zu verify`
    checks them; a broken one is named and exits 4."""
    from .lineage import chain
    from .render import render_log

    output = Output(json_mode=json_out)
    links, problems = chain(model)
    render_log(links, problems, output)
    raise typer.Exit(4 if problems else 0)
