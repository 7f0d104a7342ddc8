#!/bin/bash
# Figures 3-5 of the Distributed Llama paper on an emulated network: dllm.bench on 1, 2, 4, 8
# ranks for each sync scheme and each model, every rank-to-rank byte on the emulated link
# (python -m dllm.link), one JSON line per run; then the full-depth table beside the paper's
# numbers (python -m dllm.reproduction) and the plots (dllm.bench table --plot-dir).
#   jobs/paper-figures.sh OUT.jsonl MODEL.h5 [MODEL.h5 ...]
# Environment: LINK (default 1gbit), RANKS ("1 2 4 8"), SCHEMES ("slices partials reduce star"; a
# new scheme is one more word), PROMPT_LEN (8), DECODE_TOKENS (8), WARMUP (2), REPEAT (1),
# PYTHON (default python). Give each shape at two depths (e.g. 4 and 8 layers) so that the
# per-layer figures can be scaled to the full depth. Needs root (network namespaces).
set -euo pipefail
OUT=$1; shift
PY=${PYTHON:-python}
for model in "$@"; do
  for n in ${RANKS:-1 2 4 8}; do
    for scheme in ${SCHEMES:-slices partials reduce star}; do
      "$PY" -m dllm.link "${LINK:-1gbit}" -n "$n" -- "$PY" -m dllm.bench --model "$model" \
        --sync-scheme "$scheme" --prompt-len "${PROMPT_LEN:-8}" \
        --decode-tokens "${DECODE_TOKENS:-8}" --warmup "${WARMUP:-2}" \
        --repeat "${REPEAT:-1}" --timeout 600 --out "$OUT" > /dev/null
      [ "$n" -gt 1 ] || break       # one rank exchanges nothing: every scheme is the same run
    done
  done
done
"$PY" -m dllm.reproduction "$OUT"
