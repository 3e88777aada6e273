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
from .errors import EXIT_INTERRUPTED, UsageError, ZuError

# Options several commands share (one definition, one help text).
DEVICE_MAP = typer.Option("auto", "--device-map", help="auto, cpu, cuda, balanced or FILE.json.")
DTYPE = typer.Option("auto", "--dtype", help="Compute dtype: auto, float32, bfloat16, float16.")
JSON_OUT = typer.Option(False, "--json", help="Print one JSON document on stdout.")

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
    layers: Optional[str] = typer.Option(None, "--layers", help="Layers to edit, e.g. 17,18,19, or 'auto' (causal "
                                         "tracing, as zu locate); default: the architecture's window."),
    neutral: str = typer.Option("eos", "--neutral", help="Neutral target: 'eos' or any text."),
    multi: bool = typer.Option(False, "--multi", help="Gradient variant for many requests: an additive update in the "
                               "null space of general keys (docs/method.md)."),
    solver: Optional[str] = typer.Option(None, "--solver", help="With --multi: 'gradient' (Adam, reference) or "
                                         "'exact' (least squares)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of hyperparameters (docs/method.md)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for templates, statistics and rounding."),
    stats_corpus: Optional[str] = typer.Option(None, "--stats-corpus", help="Text for the general statistics: "
                                               ".txt, .jsonl or a folder (default: samples from the model)."),
    retain: Optional[Path] = typer.Option(None, "--retain", help="Facts to keep (request format): their prompts "
                                          "are kept unchanged by the solve, as the forget requests' neighbours are."),
    device_map: str = DEVICE_MAP,
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help='Per-device budget, e.g. "0=20GiB,cpu=60GiB".'),
    offload_dir: Optional[str] = typer.Option(None, "--offload-dir", help="Folder for weights offloaded to disk."),
    dtype: str = DTYPE,
    receipt: Optional[Path] = typer.Option(None, "--receipt", help="Where the commitment receipt goes (default: "
                                           "beside --out, never inside it)."),
    include_requests: bool = typer.Option(False, "--manifest-include-requests",
                                          help="Embed the plaintext requests in the manifest."),
    key: Optional[Path] = typer.Option(None, "--key", help="Private key PEM to sign with (default: $ZU_SIGNING_KEY, "
                                       "else the key `zu keygen` made)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
    json_out: bool = JSON_OUT,
    reveal: bool = typer.Option(False, "--reveal", help="Show request targets instead of id + hash."),
) -> None:
    """Edit a checkpoint so that it forgets the requested facts; write it with an edit manifest."""
    from .config import load_config
    from .pipeline import UnlearnOptions, run_unlearn
    from .render import render_unlearn

    output = Output(json_mode=json_out, reveal=reveal)
    if solver is not None and not multi:
        raise UsageError("--solver applies to --multi only", hint="add --multi, or drop --solver")
    hp = load_config(config, seed=seed, solver=solver)
    opts = UnlearnOptions(model=model, forget=forget, out=out, layers=layers, neutral=neutral, multi=multi,
                          stats_corpus=stats_corpus, retain=retain, device_map=device_map, max_memory=max_memory,
                          offload_dir=offload_dir, dtype=dtype, force=force, receipt=receipt,
                          include_requests=include_requests, key=key)
    render_unlearn(run_unlearn(opts, hp, output), output)


@app.command()
@handled
def demo(
    facts: int = typer.Option(3, "--facts", help="How many of the synthetic model's facts to forget."),
    json_out: bool = JSON_OUT,
) -> None:
    """The embedded default: train (or reuse) a tiny fact model, make it forget a few facts, show before/after."""
    from .demo import run_demo
    from .render import render_demo

    output = Output(json_mode=json_out, reveal=True)  # the demo's facts are fictional: nothing to hide
    render_demo(run_demo(facts, output), output)


@app.command()
@handled
def keygen(
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for zu-signing.key / .pub (default: the "
                                       "user's zu config directory)."),
    kind: str = typer.Option("ed25519", "--type", help="ed25519 or ecdsa-p256."),
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


@app.command()
@handled
def locate(
    model: Path = typer.Option(..., "--model", help="Checkpoint to trace."),
    forget: Path = typer.Option(..., "--forget", help="Requests (with subjects) whose facts to locate."),
    num_layers: int = typer.Option(3, "--num-layers", help="Width of the suggested window of consecutive layers."),
    samples: int = typer.Option(5, "--samples", help="Noise samples per request."),
    window: int = typer.Option(1, "--window", help="Layers restored together around each scored layer."),
    kind: str = typer.Option("mlp", "--kind", help="What is restored: mlp (MLP output at the subject's last token) "
                             "or hidden (residual stream entering the layer, at the subject tokens)."),
    seed: int = typer.Option(0, "--seed", help="Noise seed."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG heatmap (needs the zu-cli[plot] extra)."),
    device_map: str = DEVICE_MAP,
    dtype: str = DTYPE,
    json_out: bool = JSON_OUT,
    reveal: bool = typer.Option(False, "--reveal", help="Show request targets instead of id + hash."),
) -> None:
    """Causal tracing: which layers recall the facts, and the window `--layers auto` would edit."""
    from .locate import TraceSettings
    from .pipeline import LocateOptions, run_locate
    from .render import check_plot, render_locate

    if plot is not None:
        check_plot()  # fail before the tracing, not after
    output = Output(json_mode=json_out, reveal=reveal)
    st = TraceSettings(samples=samples, window=window, kind=kind, seed=seed)
    scores, cached = run_locate(LocateOptions(model=model, forget=forget, num_layers=num_layers, settings=st,
                                              device_map=device_map, dtype=dtype), output)
    render_locate(scores, cached, output, plot)


manifest_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                           help="Read a checkpoint's edit manifest, prove what a receipt says.")
app.add_typer(manifest_app, name="manifest")


@manifest_app.command("show")
@handled
def manifest_show(
    model: Path = typer.Argument(..., help="Checkpoint directory written by `zu unlearn`."),
    json_out: bool = typer.Option(False, "--json", help="Print the statement as JSON on stdout."),
) -> None:
    """A readable summary of the manifest (it is not verified: `zu verify` does that)."""
    from .integrity import read_manifest
    from .render import render_manifest

    render_manifest(read_manifest(model), Output(json_mode=json_out))


@manifest_app.command("prove")
@handled
def manifest_prove(
    model: Path = typer.Argument(..., help="Checkpoint directory written by `zu unlearn`."),
    receipt: Path = typer.Option(..., "--receipt", help="The receipt `zu unlearn` wrote beside --out."),
    forget: Path = typer.Option(..., "--forget", help="Requests to test for membership (.jsonl or .yaml)."),
    json_out: bool = JSON_OUT,
    reveal: bool = typer.Option(False, "--reveal", help="Show request targets instead of id + hash."),
) -> None:
    """Say which requests were part of the edit (exit 0 when all were, 1 when any was not)."""
    from .pipeline import run_prove
    from .render import render_prove

    output = Output(json_mode=json_out, reveal=reveal)
    rows = run_prove(model, receipt, forget, output)
    render_prove(rows, output)
    if not all(r["in_manifest"] for r in rows):
        raise typer.Exit(1)


@app.command()
@handled
def verify(
    model: Path = typer.Option(..., "--model", help="Checkpoint to verify."),
    forget: Optional[Path] = typer.Option(None, "--forget", help="Requests that must be forgotten (without it: "
                                          "integrity of the signed manifest only)."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="The base checkpoint: probes side by side, "
                                            "Eff/Gen/Spe and the perplexity gate."),
    retain: Optional[Path] = typer.Option(None, "--retain", help="Facts that must still be answered (request format)."),
    text: Optional[Path] = typer.Option(None, "--text", help="Prose for perplexity (default with --baseline: a "
                                        "bundled text)."),
    deep: bool = typer.Option(False, "--deep", help="Logit lens: is the target still decodable at each layer?"),
    max_rank: int = typer.Option(0, "--max-rank", help="A forgotten target still counts as recalled when its first "
                                 "token ranks at most this (0 = top-1)."),
    max_prob: float = typer.Option(0.25, "--max-prob", help="... or when the whole target's probability exceeds this."),
    max_ppl_ratio: float = typer.Option(1.05, "--max-ppl-ratio", help="Perplexity after/before allowed "
                                        "(with --baseline)."),
    deep_k: int = typer.Option(10, "--deep-k", help="--deep calls a target decodable when it ranks below this."),
    public_key: Optional[Path] = typer.Option(None, "--public-key", help="Pin the signer: its public key PEM."),
    require_key: bool = typer.Option(False, "--require-key", help="Fail (exit 4) unless the signer is pinned."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML, one test case per probe."),
    device_map: str = DEVICE_MAP,
    dtype: str = DTYPE,
    json_out: bool = JSON_OUT,
    reveal: bool = typer.Option(False, "--reveal", help="Show prompts, targets and model text instead of id + hash."),
) -> None:
    """Check the signed manifest, then probe: exit 0 all pass, 1 a probe failed, 4 integrity failure."""
    from .pipeline import VerifyOptions, run_verify
    from .render import render_verify
    from .verify import Criteria

    output = Output(json_mode=json_out, reveal=reveal)
    crit = Criteria(max_rank=max_rank, max_prob=max_prob, max_ppl_ratio=max_ppl_ratio, deep_k=deep_k)
    report = run_verify(VerifyOptions(model=model, forget=forget, public_key=public_key, require_key=require_key,
                                      baseline=baseline, retain=retain, text=text, deep=deep, criteria=crit,
                                      device_map=device_map, dtype=dtype), output)
    render_verify(report, output, junit)
    report.raise_for_status()


def run() -> None:
    """Console-script entry point."""
    app()
