#!/usr/bin/env bash
# Run the trainer as N local processes sharing one jax.distributed coordinator.
#
# This is the CPU stand-in for a multi-host TPU slice: every process gets the same ARGS plus
# --coordinator_address 127.0.0.1:PORT --num_processes N --process_id I, and inherits the
# environment (set XLA_FLAGS=--xla_force_host_platform_device_count=D for D devices per process).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local.sh N [ARGS...]

Runs `$PYTHON -m trecvit_dist.main ARGS --coordinator_address 127.0.0.1:PORT
--num_processes N --process_id I` for I = 0..N-1, prefixing every output line with [I].

If one process fails, the others get SIGTERM (then SIGKILL after LOCAL_GRACE seconds), so a
peer blocked in a collective never hangs the launcher. SIGINT/SIGTERM to the launcher are
forwarded to all processes (the trainer checkpoints and exits 42).

Exit status: 0 if every process exited 0; 42 if every process exited 42 (preempted, resume
by running the same command again); otherwise the status of the first process that failed
on its own (1 if all failures were caused by the launcher's own signals).

Environment:
  PYTHON                interpreter (default: python)
  TRECVIT_MAIN_MODULE   module to run (default: trecvit_dist.main; tests substitute a fake)
  COORDINATOR_PORT      coordinator port on 127.0.0.1 (default: a free port)
  LOCAL_GRACE           seconds between SIGTERM and SIGKILL for the survivors (default: 30)
  XLA_FLAGS, JAX_PLATFORMS, ...  passed through unchanged to every process

Example (2 processes x 4 CPU devices):
  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
    launch/local.sh 2 --config configs/synthetic_tiny.py --workdir /tmp/tiny
EOF
}

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  usage
  [[ $# -ge 1 ]] && exit 0
  exit 2
fi
num_processes=$1
shift
if ! [[ $num_processes =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: N must be a positive integer, got '$num_processes'" >&2
  exit 2
fi

python=${PYTHON:-python}
module=${TRECVIT_MAIN_MODULE:-trecvit_dist.main}
grace=${LOCAL_GRACE:-30}
# Ask the kernel for a free port. Another program could take it before the coordinator binds
# it, but that race is rare on a dev box and fails loudly rather than silently.
port=${COORDINATOR_PORT:-$("$python" -c \
  'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/trecvit_local.XXXXXX")
pids=()     # trainer process ids, indexed by process id
readers=()  # the line-prefixing readers, waited for at the end so no output is lost
rcs=()      # exit status per process, empty while running
first_failure=""
signalled=0  # 1 once the launcher itself has sent SIGTERM to the processes

# shellcheck disable=SC2329  # invoked by the EXIT trap
cleanup() {
  # Never leave a trainer behind, whatever made us exit.
  local pid
  for pid in "${pids[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
  done
  rm -rf "$tmp"
}
trap cleanup EXIT

terminate_all() {
  signalled=1
  local i
  for i in "${!pids[@]}"; do
    if [[ -z ${rcs[i]-} ]]; then
      kill -TERM "${pids[i]}" 2>/dev/null || true
    fi
  done
  deadline=$((SECONDS + grace))
}
deadline=""
trap 'echo "local.sh: signal received, stopping all processes" >&2; terminate_all' INT TERM

export PYTHONUNBUFFERED=1  # so interleaved lines show up as they are written
echo "local.sh: $num_processes processes, coordinator 127.0.0.1:$port" >&2
for ((i = 0; i < num_processes; i++)); do
  # A FIFO rather than `cmd | prefix &`: $! is then the trainer itself (so we can signal it and
  # read its exit status) and the reader is a separate job we can wait for.
  mkfifo "$tmp/out.$i"
  (while IFS= read -r line || [[ -n $line ]]; do printf '[%d] %s\n' "$i" "$line"; done) \
    <"$tmp/out.$i" &
  readers+=($!)
  "$python" -m "$module" "$@" \
    --coordinator_address "127.0.0.1:$port" --num_processes "$num_processes" --process_id "$i" \
    >"$tmp/out.$i" 2>&1 &
  pids+=($!)
done

# Poll rather than `wait -n -p` (bash >= 5.1) so this runs on older bash too; bash reaps exited
# children in the background, so `kill -0` fails once a process has exited.
running=$num_processes
while ((running > 0)); do
  for i in "${!pids[@]}"; do
    [[ -n ${rcs[i]-} ]] && continue
    kill -0 "${pids[i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[i]}" || rc=$?
    rcs[i]=$rc
    running=$((running - 1))
    if ((rc == 42 && !signalled)) && [[ -z $first_failure ]]; then
      # Preempted: the processes agreed on a step and are saving it; the others exit 42 on their
      # own once their part of the checkpoint is written. Stop them only if they do not.
      if ((running > 0)) && [[ -z $deadline ]]; then
        echo "local.sh: process $i preempted (42); waiting up to ${grace}s for the others" >&2
        deadline=$((SECONDS + grace))
      fi
    elif ((rc != 0)); then
      echo "local.sh: process $i exited with status $rc" >&2
      if ((!signalled)); then
        first_failure=$rc
        if ((running > 0)); then
          echo "local.sh: stopping the other processes" >&2
        fi
        terminate_all
      fi
    fi
  done
  if [[ -n $deadline ]] && ((SECONDS >= deadline)); then
    for i in "${!pids[@]}"; do
      if [[ -z ${rcs[i]-} ]]; then
        kill -KILL "${pids[i]}" 2>/dev/null || true
      fi
    done
  fi
  if ((running > 0)); then
    sleep 0.2
  fi
done
wait "${readers[@]}" 2>/dev/null || true

all_zero=1
all_preempted=1
for rc in "${rcs[@]}"; do
  ((rc == 0)) || all_zero=0
  ((rc == 42)) || all_preempted=0
done
if ((all_zero)); then
  exit 0
elif ((all_preempted)); then
  echo "local.sh: all processes preempted (42); run the same command again to resume" >&2
  exit 42
elif [[ -n $first_failure && $first_failure != 42 ]]; then
  exit "$first_failure"
fi
exit 1
