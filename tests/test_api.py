"""The Python API (issue 29): docs/python.md's example runs verbatim on the synthetic fact model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "python.md"


def _example() -> str:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)[0]


def test_documented_example_runs_verbatim(fact_model_dir, tmp_path, monkeypatch, capsys):
    import shutil

    from zu_cli.demo import Fact

    shutil.copytree(fact_model_dir, tmp_path / "ckpt")
    facts = [Fact(**f) for f in json.loads((fact_model_dir / "facts.json").read_text())]
    forget = [f for f in facts if f.relation == "city"][:2]
    (tmp_path / "forget.jsonl").write_text("".join(
        json.dumps({"id": f"f{i}", "prompt": f.prompt(), "target": f.answer}) + "\n" for i, f in enumerate(forget)))
    monkeypatch.chdir(tmp_path)
    exec(compile(_example(), str(DOC), "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == str({"forgotten": 2, "still_recalled": 0, "not_recalled_before": 0, "total": 2})
    assert printed[-2:] == ["0", "1"]
    stmt = json.loads((tmp_path / "ckpt-clean" / "zu-manifest.json").read_text())
    assert stmt["predicate"]["requests"]["count"] == 2 and forget[0].answer not in json.dumps(stmt)


def test_api_raises_the_cli_errors(tmp_path):
    from zu_cli import unlearn
    from zu_cli.errors import ZuError

    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ZuError) as info:
        unlearn(tmp_path / "missing", tmp_path / "bad.jsonl", tmp_path / "out")
    assert info.value.exit_code == 2 and "bad.jsonl" in str(info.value) and not (tmp_path / "out").exists()


def test_import_stays_light():
    """``import zu_cli`` (the CLI's --version) loads neither torch nor the pipeline."""
    import subprocess
    import sys

    code = "import sys, zu_cli; print('torch' in sys.modules, 'zu_cli.api' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == \
        ["False", "False"]


def test_verify_is_the_function_after_every_module_is_loaded():
    """``from zu_cli import verify`` must not give a submodule of that name once the pipeline ran."""
    import importlib
    import pkgutil

    import zu_cli

    for mod in pkgutil.iter_modules(zu_cli.__path__):
        if mod.name != "__main__":  # that one runs the CLI
            importlib.import_module(f"zu_cli.{mod.name}")
    from zu_cli import unlearn, verify

    assert callable(verify) and callable(unlearn) and verify.__module__ == "zu_cli.api"
