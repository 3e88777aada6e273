"""Forget-request files (design §3): JSONL, YAML (list or ``requests:`` + ``defaults:``), CounterFact."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import InputFileError

FIELDS = {"id", "prompt", "subject", "target", "paraphrases", "neighbors", "neutral"}
# Descriptive fields that ride along (facts-dev.jsonl carries them); ignored by the edit.
META_FIELDS = {"relation", "source", "meta"}
COUNTERFACT_FIELDS = {"case_id", "pararel_idx", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts",
                      "attribute_prompts", "generation_prompts"}


@dataclass(frozen=True)
class Neighbor:
    """A fact that must still hold after the edit."""

    prompt: str
    target: str


@dataclass(frozen=True)
class Request:
    """One forget request.

    Attributes:
        id: unique id (given, or ``r<n>`` by position).
        prompt: the prompt with the subject filled in.
        subject: the subject, a literal substring of ``prompt``, or None (look up at the last token).
        target: the sensitive answer, without a leading space.
        paraphrases: other prompts for the same fact (probes).
        neighbors: facts that must be kept (probes).
        neutral: per-request neutral target overriding ``--neutral``, or None.
        where: ``file:line`` (or YAML path) it came from, for messages.
    """

    id: str
    prompt: str
    subject: str | None
    target: str
    paraphrases: tuple[str, ...] = ()
    neighbors: tuple[Neighbor, ...] = ()
    neutral: str | None = None
    where: str = field(default="", compare=False)

    def identity(self) -> dict[str, Any]:
        """What names the request, without the probes that may travel with it (commitments)."""
        return {"id": self.id, "prompt": self.prompt, "subject": self.subject, "target": self.target,
                "neutral": self.neutral}

    def canonical(self) -> dict[str, Any]:
        """The request as a canonical mapping (for commitments and manifests)."""
        return {"id": self.id, "prompt": self.prompt, "subject": self.subject, "target": self.target,
                "paraphrases": list(self.paraphrases),
                "neighbors": [{"prompt": n.prompt, "target": n.target} for n in self.neighbors],
                "neutral": self.neutral}


def _fail(where: str, fld: str | None, msg: str) -> InputFileError:
    return InputFileError(f"{where}: field '{fld}': {msg}" if fld else f"{where}: {msg}")


def _text(obj: dict, key: str, where: str, required: bool) -> str | None:
    val = obj.get(key)
    if val is None and not required:
        return None
    if not isinstance(val, str) or not val.strip():
        raise _fail(where, key, "missing or empty" if val in (None, "") else f"must be a non-empty string, got {val!r}")
    return val


def _from_counterfact(obj: dict, where: str) -> dict:
    rr = obj.get("requested_rewrite")
    if not isinstance(rr, dict):
        raise _fail(where, "requested_rewrite", "must be an object")
    true = rr.get("target_true")
    if not isinstance(true, dict) or not isinstance(true.get("str"), str):
        raise _fail(where, "requested_rewrite.target_true", "missing its 'str'")
    target = true["str"].strip()
    return {"id": str(obj.get("case_id", "")) or None, "prompt": rr.get("prompt"), "subject": rr.get("subject"),
            "target": target, "paraphrases": obj.get("paraphrase_prompts") or [],
            "neighbors": [{"prompt": p, "target": target} for p in obj.get("neighborhood_prompts") or []]}


def _build(obj: Any, where: str, index: int, defaults: dict) -> Request:
    if not isinstance(obj, dict):
        raise _fail(where, None, f"a request must be an object, got {type(obj).__name__}")
    if "requested_rewrite" in obj:
        unknown = set(obj) - COUNTERFACT_FIELDS
        obj = _from_counterfact(obj, where) if not unknown else obj
    unknown = set(obj) - FIELDS - META_FIELDS
    if unknown:
        raise _fail(where, sorted(unknown)[0], "unknown key (known: " + ", ".join(sorted(FIELDS | META_FIELDS)) + ")")
    obj = {**defaults, **{k: v for k, v in obj.items() if v is not None}}
    prompt = _text(obj, "prompt", where, True)
    target = _text(obj, "target", where, True).strip()
    subject = _text(obj, "subject", where, False)
    if "{}" in prompt:
        if subject is None:
            raise _fail(where, "subject", "the prompt has a '{}' placeholder but no subject is given")
        prompt = prompt.replace("{}", subject)
    elif subject is not None and subject not in prompt:
        raise _fail(where, "subject", "not found in the prompt")
    rid = obj.get("id", f"r{index + 1}")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid).strip() == "":
        raise _fail(where, "id", "must be a non-empty string")
    paras = obj.get("paraphrases") or []
    if not isinstance(paras, list) or not all(isinstance(p, str) and p.strip() for p in paras):
        raise _fail(where, "paraphrases", "must be a list of non-empty strings")
    nbrs = []
    for j, nb in enumerate(obj.get("neighbors") or []):
        if not isinstance(nb, dict) or set(nb) - {"prompt", "target"}:
            raise _fail(where, f"neighbors[{j}]", "must be an object with 'prompt' and 'target'")
        nbrs.append(Neighbor(_text(nb, "prompt", where + f" neighbors[{j}]", True),
                             _text(nb, "target", where + f" neighbors[{j}]", True).strip()))
    neutral = _text(obj, "neutral", where, False)
    return Request(id=str(rid), prompt=prompt, subject=subject, target=target, paraphrases=tuple(paras),
                   neighbors=tuple(nbrs), neutral=neutral, where=where)


def _records(path: Path, text: str) -> list[tuple[Any, str]]:
    """(object, location) pairs plus YAML defaults folded in."""
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            at = f"{path}:{line + 1}" if line is not None else str(path)
            raise InputFileError(f"{at}: malformed YAML: {getattr(exc, 'problem', exc)}") from exc
        defaults: dict = {}
        if isinstance(data, dict):
            unknown = set(data) - {"requests", "defaults"}
            if unknown:
                raise InputFileError(f"{path}: unknown top-level key {sorted(unknown)[0]!r} (known: requests, defaults)")
            defaults = data.get("defaults") or {}
            if not isinstance(defaults, dict):
                raise InputFileError(f"{path}: field 'defaults': must be a mapping")
            data = data.get("requests")
        if not isinstance(data, list):
            raise InputFileError(f"{path}: expected a list of requests (or a mapping with 'requests:')")
        return [({**defaults, **o} if isinstance(o, dict) else o, f"{path}: requests[{i}]") for i, o in enumerate(data)]
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((json.loads(line), f"{path}:{n}"))
        except json.JSONDecodeError as exc:
            raise InputFileError(f"{path}:{n}: malformed JSON: {exc.msg} (column {exc.colno})") from exc
    return out


def load_requests(path: str | Path) -> list[Request]:
    """Read and validate a forget-request file.

    Args:
        path: ``.jsonl`` / ``.json`` (one object per line) or ``.yaml`` / ``.yml``.

    Returns:
        The requests in file order.

    Raises:
        InputFileError: unreadable, malformed or empty file; missing/empty prompt or target; subject
            not in the prompt; duplicate ids; unknown keys. The message names file, line and field.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read request file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise InputFileError(f"{path}: not UTF-8 text") from exc
    records = _records(path, text)
    if not records:
        raise InputFileError(f"{path}: no requests in the file", hint="one JSON object per line, see docs/requests.md")
    requests, seen = [], {}
    for i, (obj, where) in enumerate(records):
        req = _build(obj, where, i, {})
        if req.id in seen:
            raise _fail(where, "id", f"duplicate id {req.id!r} (first at {seen[req.id]})")
        seen[req.id] = where
        requests.append(req)
    return requests
