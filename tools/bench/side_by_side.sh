#!/usr/bin/env bash
# One sitting of prompt and generation throughput, engines alternating round by round so that
# the machine's drifting memory speed hits them alike (BENCHMARKS.md quotes medians of these).
#
#   tools/bench/side_by_side.sh ROUNDS OUTDIR
#
# Environment (all optional but MODEL):
#   MODEL        qnext checkpoint folder (e.g. from `qnext synth --fp8`)
#   QNEXT        "name=path/to/qnext name2=path2 …" binaries to compare (default: qnext=target/release/qnext)
#   QNEXT_ARGS   extra arguments for `qnext bench` (e.g. "--exact")
#   GGUF         a GGUF of the same weights for the peers
#   LLAMA_BENCH  llama.cpp's llama-bench;  IK_BENCH  ik_llama.cpp's llama-bench (run with -rtr 1 -thp 1)
#   PP, TG, REPEAT  prompt tokens, generated tokens, repetitions per run (512, 32, 2)
# Each run writes OUTDIR/<round>-<name>.json; tools/bench/summarize.py prints the medians.
set -euo pipefail
rounds=${1:?rounds}; out=${2:?outdir}
: "${MODEL:?MODEL must name a checkpoint folder}"
QNEXT=${QNEXT:-qnext=target/release/qnext}
PP=${PP:-512}; TG=${TG:-32}; REPEAT=${REPEAT:-2}
mkdir -p "$out"
{
  date -u +%FT%TZ
  lscpu | grep -E 'Model name|^CPU family|^Model:'
  flags=$(grep -m1 '^flags' /proc/cpuinfo)
  for f in avx2 fma f16c avx512f avx512bf16 avx_vnni amx_tile; do
    case " $flags " in *" $f "*) printf '%s ' "$f" ;; esac
  done
  echo
} > "$out/machine.txt"
for ((i = 1; i <= rounds; i++)); do
  for pair in $QNEXT; do
    name=${pair%%=*}; bin=${pair#*=}
    # shellcheck disable=SC2086
    "$bin" bench --model "$MODEL" --prompt-tokens "$PP" --gen-tokens "$TG" --repeat "$REPEAT" \
      --read-bandwidth --json ${QNEXT_ARGS:-} > "$out/$i-$name.json"
  done
  if [ -n "${LLAMA_BENCH:-}" ]; then
    "$LLAMA_BENCH" -m "$GGUF" -t 2 -p "$PP" -n "$TG" -r "$REPEAT" -o json > "$out/$i-llama.json"
  fi
  if [ -n "${IK_BENCH:-}" ]; then
    "$IK_BENCH" -m "$GGUF" -t 2 -p "$PP" -n "$TG" -r "$REPEAT" -rtr 1 -thp 1 -o json > "$out/$i-ik.json"
  fi
done
