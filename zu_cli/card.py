"""The output's model card (``README.md``): the metadata the Hub reads (``base_model``,
``base_model_relation``, ``tags``) and an "Unlearning" section, written with huggingface_hub's
ModelCard. Existing card content is kept; an earlier zu section is replaced. No prompt, subject or
target ever enters it: only counts, layers, dates and the signer's key id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .manifest import SIGNATURE

CARD = "README.md"
START = "<!-- zu:unlearning:start -->"
END = "<!-- zu:unlearning:end -->"
TAGS = ("unlearning", "zu")


@dataclass(frozen=True)
class CardInfo:
    """What the card says about one edit (nothing a request contains).

    Attributes:
        base_model: the source repo id, or the base named by an earlier card, or the source folder's name.
        date: UTC date of the edit (YYYY-MM-DD).
        variant: ``closed-form`` or ``multi-…``.
        layers: the edited layers.
        requests: how many requests were forgotten in this edit.
        keyid: the signer's key id.
        signature: ``model.sig`` (model-signing) or ``zu-manifest.dsse.json``.
        earlier_edits: how many zu edits the input already carried (its history).
    """

    base_model: str
    date: str
    variant: str
    layers: list[int]
    requests: int
    keyid: str
    signature: str
    earlier_edits: int = 0


def section(info: CardInfo) -> str:
    """The "Unlearning" section, between markers so a later edit replaces it."""
    verify = ["zu verify --model . --public-key zu-signing.pub"]
    if info.signature == SIGNATURE:
        verify.append("model_signing verify key --signature model.sig --public_key zu-signing.pub .")
    history = (f"\n- Earlier zu edits of this checkpoint: {info.earlier_edits} (their signed manifests are in "
               "`zu-history/`; `zu log .` lists them)" if info.earlier_edits else "")
    return "\n".join([
        START, "## Unlearning", "",
        f"This checkpoint was edited with [zu](https://pypi.org/project/zu-cli/) (ZeroUnlearn) to forget "
        f"{info.requests} requested fact{'s' if info.requests != 1 else ''}. The requests themselves are not "
        "published; the signed manifest commits to each without revealing it.", "",
        f"- Date: {info.date}", f"- Method: {info.variant}, layers {', '.join(map(str, info.layers))}",
        f"- Signed by key `{info.keyid}` (`zu-manifest.json`, signature `{info.signature}`){history}", "",
        "Verify the files and the edit record with the signer's public key:", "", "```bash", *verify, "```", END,
    ])


def write_card(out_dir: Path, info: CardInfo) -> None:
    """Write or update ``out_dir/README.md``: metadata merged, the zu section replaced or appended.

    Args:
        out_dir: the (temporary) output folder, before it is signed.
        info: the edit's public facts.
    """
    from huggingface_hub import ModelCard

    path = out_dir / CARD
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if not text.startswith("---"):  # no metadata block yet: start one (ModelCard warns on its absence)
        text = "---\nlibrary_name: transformers\n---\n" + text
    card = ModelCard(text)
    data = card.data
    if not getattr(data, "base_model", None):
        data.base_model = info.base_model
    data.base_model_relation = "finetune"  # the Hub's word for weights derived by changing them
    data.tags = list(dict.fromkeys([*(data.tags or []), *TAGS]))
    body = card.text
    if START in body and END in body:
        head, rest = body.split(START, 1)
        body = head + section(info) + rest.split(END, 1)[1]
    else:
        body = body.rstrip() + ("\n\n" if body.strip() else "\n") + section(info) + "\n"
    card.text = body
    path.write_text(card.content, encoding="utf-8")
