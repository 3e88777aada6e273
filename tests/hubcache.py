"""A Hugging Face cache in the hub's own layout, built from a local checkpoint (no network here).

``HF_HOME/hub/models--ORG--NAME/{blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main}``:
what ``hf download`` leaves behind, so ``--model ORG/NAME`` resolves offline as for a real user.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

COMMIT = "c0ffee" * 6 + "abcd"


def hub_cache(hf_home: Path, repo_id: str, model_dir: Path, commit: str = COMMIT) -> Path:
    """Put ``model_dir`` into the cache at ``hf_home`` as ``repo_id`` at revision ``commit`` (refs/main).

    Returns:
        ``hf_home`` (for ``HF_HOME``).
    """
    repo = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(model_dir).rglob("*")):
        if not f.is_file():
            continue
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copyfile(f, blob)
        link = snap / f.relative_to(model_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return Path(hf_home)


if __name__ == "__main__":
    import sys

    print(hub_cache(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])))
