#!/usr/bin/env bash
# Run one named stage of `make test` and record its time: stage.sh NAME CMD...; stage.sh --summary
# pytest's exit 5 ("no tests collected") is a failure: every stage must test something.
set -uo pipefail
times="${STAGE_TIMES:?STAGE_TIMES names the file that collects stage times}"
if [ "$1" = "--summary" ]; then
  printf '\n%-14s %8s\n' stage seconds
  cat "$times" 2>/dev/null
  rm -f "$times"
  exit 0
fi
name=$1; shift
printf '\n\033[1m==> [%s] %s\033[0m\n' "$name" "$*"
start=$(date +%s)
bash -c "$*"
rc=$?
took=$(( $(date +%s) - start ))
printf '%-14s %8d%s\n' "$name" "$took" "$([ $rc -ne 0 ] && echo "  FAILED (exit $rc)")" >>"$times"
printf '\033[1m==> [%s] %ss, exit %s\033[0m\n' "$name" "$took" "$rc"
if [ $rc -ne 0 ]; then
  cat "$times"; rm -f "$times"
  exit $rc
fi
