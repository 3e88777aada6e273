"""Time to write a checkpoint with one edited tensor vs. a plain copy of it (design §3 writer).

    python bench/write.py [--model DIR]      # default: SmolLM2-135M fp32 (538 MB, one file)

Prints one JSON document. Each timing is the best of --repeat runs (page cache warm).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    if a.model is None:
        from smollm2 import smollm2_fp32

        a.model = str(smollm2_fp32())
    from zu_cli.checkpoint import open_checkpoint, write_checkpoint

    ckpt = open_checkpoint(a.model)
    name = ckpt.spec.down_proj_weight(18)
    edited = {name: ckpt.read_tensor(name) * 1.01}
    size = sum(p.stat().st_size for p in ckpt.path.iterdir() if p.is_file())
    copy_s, write_s = [], []
    with tempfile.TemporaryDirectory(dir=Path(a.model).parent) as tmp:
        for i in range(a.repeat):
            t0 = time.perf_counter()
            shutil.copytree(ckpt.path, Path(tmp) / f"copy{i}")
            copy_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            write_checkpoint(ckpt, Path(tmp) / f"zu{i}", edited)
            write_s.append(time.perf_counter() - t0)
            shutil.rmtree(Path(tmp) / f"copy{i}")
            shutil.rmtree(Path(tmp) / f"zu{i}")
    print(json.dumps({"model": a.model, "bytes": size, "shards": len(ckpt.shards()), "edited": name,
                      "plain_copy_s": round(min(copy_s), 2), "zu_write_s": round(min(write_s), 2)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
