#!/usr/bin/env bash
# One GPU session's check on a machine without a package index (../shared/GPU.md): the wheels npp needs and the
# image lacks (deepspeed, fire, ...; `make gpu-wheels` puts them in .whl/) are installed offline into a temporary
# site, then bench/gpu_check.py runs each of PARTS (default: sample launch train xxl; `extras` adds memory, the
# other engines, the EMA, Inception and the rest of sampling) as a process of its own under PART_BUDGET_S (480)
# and writes its figures as JSON lines to $OUT/figures.jsonl as it goes (what finished before a budget ran out
# is kept). Arguments go to gpu_check.py.
#
#   OUT=/path PART_BUDGET_S=240 bash bench/gpu_session.sh        # on the GPU machine
#   PYTHON=.venv/bin/python bash bench/gpu_session.sh --rehearse --nocompile   # the same script on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
if "$PYTHON" -c "import deepspeed, fire" >/dev/null 2>&1; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu_session: deepspeed/fire are not installed here and .whl/ holds no wheels: run \`make gpu-wheels\`" \
      "on a machine with a package index and carry .whl/ along" >&2
    exit 2
  fi
  site="${TMPDIR:-/tmp}/npp-site"
  "$PYTHON" -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" -c "import torch; print('gpu_session: torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if [[ " $* " == *" --rehearse "* ]]; then  # the CPU rehearsal imports only what the GPU image has or .whl carries
  export NPP_GPU_IMAGE_GUARD=1 PYTHONPATH="$PWD/bench/image_guard:$PYTHONPATH"
fi
# Each part in a process of its own, under its own budget, in this order (sampling and the launch first: the rows
# a short session must not miss); every row is in $OUT/figures.jsonl as soon as it is measured.
status=0
for part in ${PARTS:-sample launch train xxl}; do
  echo "gpu_session: part $part (budget ${PART_BUDGET_S:-480} s)"
  timeout --signal=TERM "${PART_BUDGET_S:-480}" "$PYTHON" bench/gpu_check.py --only "$part" \
    --out "$OUT/figures.jsonl" "$@" || { rc=$?; echo "gpu_session: part $part ended with $rc"; status=$rc; }
done
exit $status
