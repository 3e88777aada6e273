"""The zu command line: thin commands (parse -> pipeline -> render); ZuError -> exit code.

torch and transformers are imported inside the commands so that ``zu --help`` answers at once.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Literal, Optional

import typer
from typer.core import TyperCommand

from . import __version__
from .console import Output
from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, UsageError, ZuError

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}

# Options several commands share (one definition, one help text).
MODEL = typer.Option(..., "--model", metavar="DIR|ORG/NAME[@REV]",
                     help="Checkpoint directory, or a Hugging Face Hub id (its cache; HF_HUB_OFFLINE honoured).")
DEVICE_MAP = typer.Option("auto", "--device-map", metavar="auto|cpu|gpu|balanced|sequential|FILE.json",
                          help="accelerate device map.")
DTYPE = typer.Option("auto", "--dtype", help="Compute dtype (auto: float32 on CPU, bfloat16 on an accelerator).")
JSON_OUT = typer.Option(False, "--json", help="Print one JSON document on stdout.")
REVEAL = typer.Option(False, "--reveal", help="Show request targets instead of id + hash.")


class ZuCommand(TyperCommand):
    """A command whose usage line names its arguments plainly (``DIR``, not ``{DIR}``)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in super().collect_usage_pieces(ctx)]


def examples(*lines: str) -> str:
    """An epilog listing example command lines, kept as written (click's \\b stops re-wrapping)."""
    return "\b\nExamples\n" + "\n".join(f"  $ {line}" for line in lines) + \
        "\n\n\b\nLearn more\n  Every option: docs/cli.md. Exit codes: zu --help."


app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, context_settings=CONTEXT,
                  help="Make a Hugging Face causal LM forget specific facts, and prove what it did.",
                  epilog="\b\nExit codes\n  0 ok, 1 verification failed, 2 invalid usage or input, 3 checkpoint "
                         "problem,\n  4 integrity failure, 5 numerical failure, 6 an output could not be written, "
                         "\n  70 internal error (a bug), 130 interrupted.\n\n" + examples(
                             "zu demo", "zu keygen",
                             "zu unlearn --model ./ckpt --forget forget.jsonl --out ./ckpt-clean",
                             "zu verify --model ./ckpt-clean --forget probes.jsonl --baseline ./ckpt"))


def command(name: str | None = None, summary: str = "", epilog: str | None = None, parent=None):
    """Register a command with a short summary that is never cut, and examples."""
    return (parent or app).command(name, cls=ZuCommand, short_help=summary, epilog=epilog)


def handled(fn: Callable) -> Callable:
    """Turn ZuError into its one-line message, hint and exit code (traceback only with ZU_DEBUG=1);
    any other exception is a bug: exit 70, never a code CI reads as a verdict."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
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
        except Exception as exc:  # a bug: say so in one line, keep the traceback for ZU_DEBUG
            if os.environ.get("ZU_DEBUG"):
                traceback.print_exc()
            sys.stderr.write(f"zu: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                             "\n  hint: rerun with ZU_DEBUG=1 for the traceback, and report it\n")
            raise typer.Exit(EXIT_INTERNAL)

    return wrapper


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"zu {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """zu: few-shot knowledge unlearning (ZeroUnlearn) for Hugging Face checkpoints."""


@command(summary="Edit a checkpoint so it forgets the requested facts; write it with a signed manifest.",
         epilog=examples("zu unlearn --model ./ckpt --forget forget.jsonl --out ./ckpt-clean",
                         "zu unlearn --model HuggingFaceTB/SmolLM2-135M-Instruct --forget forget.jsonl --out ./clean",
                         "zu unlearn --model ./ckpt --forget many.jsonl --out ./ckpt-clean --multi --layers 6-10"))
@handled
def unlearn(
    model: str = MODEL,
    forget: Path = typer.Option(..., "--forget", metavar="FILE", help="Forget requests: .jsonl or .yaml "
                                "(docs/requests.md)."),
    out: Path = typer.Option(..., "--out", metavar="DIR", help="Output checkpoint directory (written atomically)."),
    layers: Optional[str] = typer.Option(None, "--layers", metavar="8-10|8,9,10|auto", help="Layers to edit; auto: "
                                         "causal tracing on the requests. Default: the window the model's calibration found (zu calibrate)."),
    neutral: str = typer.Option("eos", "--neutral", metavar="eos|TEXT", help="Neutral target."),
    multi: bool = typer.Option(False, "--multi", help="Gradient variant for many requests: an additive update in the "
                               "null space of general keys (docs/method.md)."),
    solver: Optional[Literal["gradient", "exact"]] = typer.Option(None, "--solver", help="With --multi: Adam "
                                                                  "(reference) or the exact least squares."),
    config: Optional[Path] = typer.Option(None, "--config", metavar="FILE.yaml", help="Hyperparameters "
                                          "(docs/method.md)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for templates, statistics and rounding."),
    stats_corpus: Optional[str] = typer.Option(None, "--stats-corpus", metavar="PATH", help="Text for the general "
                                               "statistics: .txt, .jsonl or a folder (default: samples from the "
                                               "model)."),
    retain: Optional[Path] = typer.Option(None, "--retain", metavar="FILE", help="Facts to keep (request format): "
                                          "their prompts are keep-constraints of the solve."),
    device_map: str = DEVICE_MAP,
    max_memory: Optional[str] = typer.Option(None, "--max-memory", metavar='"0=20GiB,cpu=60GiB"',
                                             help="Per-device budget."),
    offload_dir: Optional[str] = typer.Option(None, "--offload-dir", metavar="DIR", help="Folder for weights "
                                              "offloaded to disk."),
    dtype: Dtype = DTYPE,
    receipt: Optional[Path] = typer.Option(None, "--receipt", metavar="FILE", help="Where the commitment receipt "
                                           "goes (default: beside --out, never inside it)."),
    include_requests: bool = typer.Option(False, "--manifest-include-requests",
                                          help="Embed the plaintext requests in the manifest."),
    key: Optional[Path] = typer.Option(None, "--key", metavar="PEM", help="Private key to sign with (default: "
                                       "$ZU_SIGNING_KEY, else the key `zu keygen` made)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out that a previous zu run wrote."),
    no_calibrate: bool = typer.Option(False, "--no-calibrate", help="Without --layers, edit the default relative "
                                      "window instead of the model's calibrated one (no calibration run)."),
    previous: list[Path] = typer.Option([], "--previous", metavar="FILE", help="Requests an earlier edit of this "
                                        "checkpoint forgot (repeatable): held at their edited outputs so this edit "
                                        "cannot bring them back (docs/method.md, 'Requests over time')."),
    base: Optional[Path] = typer.Option(None, "--base", metavar="DIR", help="With --previous: edit the chain's "
                                        "original checkpoint with every request so far instead of editing --model, "
                                        "whose history the output extends (docs/method.md, 'Requests over time')."),
    no_card: bool = typer.Option(False, "--no-card", help="Leave the model card (README.md) as the input had it."),
    audit: Optional[str] = typer.Option(None, "--audit", metavar="quant,relearn,prompt,lens|all", help="After "
                                        "writing, run `zu verify --attack` on the output with the requests; exit 1 "
                                        "when an attack brings a fact back (the output stays written)."),
    json_out: bool = JSON_OUT,
    reveal: bool = REVEAL,
) -> None:
    """Edit a checkpoint so that it forgets the requested facts; write the result with a signed edit
    manifest and the operator's receipt. The input is never modified."""
    from .config import load_config
    from .pipeline import UnlearnOptions, run_unlearn
    from .render import render_unlearn, unlearn_json

    from .attacks import parse_attacks

    output = Output(json_mode=json_out, reveal=reveal)
    attacks = parse_attacks(audit)  # refused before any work, like every other option
    if solver is not None and not multi:
        raise UsageError("--solver applies to --multi only", hint="add --multi, or drop --solver")
    hp = load_config(config, seed=seed, solver=solver)
    opts = UnlearnOptions(model=model, forget=forget, out=out, layers=layers, neutral=neutral, multi=multi,
                          stats_corpus=stats_corpus, retain=retain, device_map=device_map, max_memory=max_memory,
                          offload_dir=offload_dir, dtype=dtype, force=force, receipt=receipt,
                          include_requests=include_requests, key=key, calibrate=not no_calibrate,
                          previous=list(previous), base=base, card=not no_card)
    with output.live():
        res = run_unlearn(opts, hp, output)
    if not attacks:
        render_unlearn(res, output)
        return
    from .pipeline_verify import VerifyOptions, run_verify
    from .render_verify import render_verify

    audit_out = Output(json_mode=False, reveal=reveal, quiet=json_out)
    with audit_out.live():
        report = run_verify(VerifyOptions(model=out, forget=forget, device_map=device_map, dtype=dtype,
                                          attacks=attacks), audit_out)
    if json_out:
        output.emit_json({**unlearn_json(res), "audit": report.to_json()})
    else:
        render_unlearn(res, output)
        render_verify(report, output)
    raise typer.Exit(report.exit_code)


@command(summary="Check the signed manifest, then probe; exit 0 pass, 1 probe failed, 4 integrity.",
         epilog=examples("zu verify --model ./ckpt-clean --public-key ~/.config/zu/zu-signing.pub",
                         "zu verify --model ./ckpt-clean --forget probes.jsonl --baseline ./ckpt "
                         "--junit reports/verify.xml"))
@handled
def verify(
    model: str = MODEL,
    forget: Optional[Path] = typer.Option(None, "--forget", metavar="FILE", help="Requests that must be forgotten "
                                          "(without it: integrity of the signed manifest only)."),
    baseline: Optional[str] = typer.Option(None, "--baseline", metavar="DIR|ORG/NAME", help="The base checkpoint: "
                                           "probes side by side, Eff/Gen/Spe and the perplexity gate."),
    retain: Optional[Path] = typer.Option(None, "--retain", metavar="FILE", help="Facts that must still be "
                                          "answered (request format)."),
    text: Optional[Path] = typer.Option(None, "--text", metavar="FILE", help="Prose for perplexity (default with "
                                        "--baseline: a bundled text)."),
    deep: bool = typer.Option(False, "--deep", help="Logit lens: is the target still decodable at each layer?"),
    attack: Optional[str] = typer.Option(None, "--attack", metavar="quant,relearn,prompt,lens|all", help="Audit "
                                         "whether the forgetting lasts: each attack probes the requests again "
                                         "(docs/verify.md, 'Attacks')."),
    quant_formats: Optional[str] = typer.Option(None, "--quant-formats", metavar="Q8_0,Q5_0,...",
                                                help="Formats for --attack quant: GGUF Q8_0, Q5_0, Q5_1, Q4_0, "
                                                "Q4_1; bitsandbytes bnb-int8, bnb-nf4, bnb-fp4 (default: "
                                                "Q8_0,Q5_0,Q4_0,bnb-int8,bnb-nf4,bnb-fp4)."),
    relearn_steps: int = typer.Option(30, "--relearn-steps", min=1, help="--attack relearn: AdamW steps."),
    relearn_lr: float = typer.Option(5e-5, "--relearn-lr", min=0.0, help="--attack relearn: learning rate."),
    max_rank: int = typer.Option(0, "--max-rank", min=0, help="A forgotten target still counts as recalled when its "
                                 "first token ranks at most this (0 = top-1)."),
    max_prob: float = typer.Option(0.25, "--max-prob", min=0.0, max=1.0, help="... or when the whole target's "
                                   "probability exceeds this."),
    max_ppl_ratio: float = typer.Option(1.05, "--max-ppl-ratio", min=1.0, help="Perplexity after/before allowed "
                                        "(with --baseline)."),
    deep_k: int = typer.Option(10, "--deep-k", min=1, help="--deep calls a target decodable when it ranks below "
                               "this."),
    public_key: Optional[Path] = typer.Option(None, "--public-key", metavar="PEM", help="Pin the signer: its "
                                              "public key."),
    require_key: bool = typer.Option(False, "--require-key", help="Fail (exit 4) unless the signer is pinned."),
    junit: Optional[Path] = typer.Option(None, "--junit", metavar="FILE.xml", help="Write JUnit XML, one test case "
                                         "per probe (folders are created)."),
    device_map: str = DEVICE_MAP,
    dtype: Dtype = DTYPE,
    json_out: bool = JSON_OUT,
    reveal: bool = typer.Option(False, "--reveal", help="Show prompts, targets and model text instead of id + hash."),
) -> None:
    """Check the signed manifest (signature, pinned signer, every file, the edited tensors), then probe
    every request, paraphrase, neighbour and retained fact. Exit 0 when all pass, 1 when a probe
    fails, 4 on an integrity failure, 6 when the JUnit report cannot be written."""
    from .attacks import AttackSettings, parse_attacks
    from .quantise import format_list
    from .pipeline_verify import VerifyOptions, run_verify
    from .render_verify import render_integrity, render_verify, write_junit
    from .verdicts import Criteria

    output = Output(json_mode=json_out, reveal=reveal)
    attacks = parse_attacks(attack)
    settings = AttackSettings(quant_formats=tuple(format_list(quant_formats or "")) or None,
                              relearn_steps=relearn_steps, relearn_lr=relearn_lr)
    crit = Criteria(max_rank=max_rank, max_prob=max_prob, max_ppl_ratio=max_ppl_ratio, deep_k=deep_k)
    opts = VerifyOptions(model=model, forget=forget, public_key=public_key, require_key=require_key,
                         baseline=baseline, retain=retain, text=text, deep=deep, criteria=crit,
                         device_map=device_map, dtype=dtype, attacks=attacks, attack_settings=settings)
    with output.live():
        report = run_verify(opts, output, on_integrity=lambda r: render_integrity(r, output))
    render_verify(report, output)
    if junit is not None:
        write_junit(report, junit)
    raise typer.Exit(report.exit_code)


from . import cli_records, cli_tools  # noqa: E402,F401  (register keygen, manifest, log; calibrate, demo, locate)


def run() -> None:
    """Console-script entry point."""
    app()
