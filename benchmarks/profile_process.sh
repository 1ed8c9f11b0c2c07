#!/usr/bin/env bash
# Sample a server process with py-spy for its whole life, from outside (it is not slowed or paused):
#   benchmarks/profile_process.sh 'workers[.]main' out/worker-profile.txt &
#   benchmarks/profile_process.sh 'controller[.]cli serve' out/controller-profile.txt &
#   python benchmarks/replay.py --config ... (starts the server these wait for)
# $1 is a pgrep -f pattern (write one character in brackets so that it does not match this script's own
# command line); $2 gets raw collapsed stacks (function names, no line numbers; `--idle` keeps the time
# spent waiting). PY_SPY names the py-spy binary (default: py-spy on PATH; pip install py-spy).
set -euo pipefail
pattern=$1; out=$2; pid=
for _ in $(seq 1 1200); do pid=$(pgrep -f "$pattern" | head -1 || true); [ -n "$pid" ] && break; sleep 0.25; done
[ -z "$pid" ] && { echo "no process matched $pattern" >&2; exit 1; }
"${PY_SPY:-py-spy}" record --pid "$pid" --duration 3600 --rate 100 --idle --nonblocking --nolineno --format raw -o "$out" \
    >&2
