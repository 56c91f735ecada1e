#!/usr/bin/env bash
# The half of tpu.sh that runs on every TPU worker (shipped there by `tpu.sh setup` inside the
# source tarball and invoked over `gcloud ... ssh --worker=all`).
#
# Keeping the remote logic in a file, rather than in long ssh command strings, means the
# commands tpu.sh sends stay short and readable, and this half can be tested on any Linux box.
#
# State lives in RUN_DIR (default ~/trecvit_run) on each worker's own disk:
#   src/         the project at the commit `tpu.sh setup` shipped (src/.commit names it)
#   venv/        its virtualenv
#   train.log    the trainer's stdout+stderr for the current attempt (train.log.prev: the one before)
#   pid          the wrapper process (also its process group: it runs under setsid)
#   trainer_pid  the python process
#   exit_code    written once, atomically, when the trainer has exited: the supervisor's signal
#   failure      written by a failing trainer ($TRECVIT_FAILURE_FILE): "step=S error=DIGEST" and
#                the message; status reports the first line, so the supervisor can tell a failure
#                that repeats (same step, same error) from one worth retrying
set -euo pipefail

RUN_DIR=${TRECVIT_RUN_DIR:-$HOME/trecvit_run}
PYTHON=${TRECVIT_PYTHON:-$RUN_DIR/venv/bin/python}
MODULE=${TRECVIT_MAIN_MODULE:-trecvit_dist.main}
LOCKFILE=${TPU_LOCKFILE:-/tmp/libtpu_lockfile}
LOG=$RUN_DIR/train.log
EXIT_FILE=$RUN_DIR/exit_code
PID_FILE=$RUN_DIR/pid
TRAINER_PID_FILE=$RUN_DIR/trainer_pid
FAILURE_FILE=$RUN_DIR/failure
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")

usage() {
  cat <<'EOF'
Usage (on a TPU worker; normally called by launch/tpu.sh):
  worker.sh setup COMMIT PYTHON_VERSION  install RUN_DIR/src.new as RUN_DIR/src + virtualenv
  worker.sh start ARGS...      start `python -m trecvit_dist.main ARGS` detached; log to train.log
  worker.sh status             print `TRECVIT_STATUS HOST idle|running|lost|exited RC [step=S error=D]`
  worker.sh stop [GRACE]       SIGTERM trainers, SIGKILL after GRACE s (default 120), rm TPU lock
  worker.sh logs [LINES] [follow]  tail train.log, each line prefixed with [HOST]
EOF
}

host() { hostname 2>/dev/null || echo unknown-host; }

# True if the wrapper recorded in PID_FILE is alive. The cmdline check guards against pid reuse:
# the pid file survives a reboot, the process does not.
wrapper_alive() {
  local pid
  [[ -f $PID_FILE ]] || return 1
  pid=$(<"$PID_FILE")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  if [[ -r /proc/$pid/cmdline ]]; then
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "worker.sh _train" || return 1
  fi
}

cmd_status() {
  local failure=""
  if [[ -f $EXIT_FILE ]]; then
    if [[ -f $FAILURE_FILE ]]; then
      read -r failure <"$FAILURE_FILE" || true
    fi
    echo "TRECVIT_STATUS $(host) exited $(<"$EXIT_FILE")${failure:+ $failure}"
  elif wrapper_alive; then
    echo "TRECVIT_STATUS $(host) running"
  elif [[ -f $PID_FILE ]]; then
    # Started but gone without recording a status: killed with SIGKILL, or the VM rebooted.
    echo "TRECVIT_STATUS $(host) lost"
  else
    echo "TRECVIT_STATUS $(host) idle"
  fi
}

cmd_start() {
  mkdir -p "$RUN_DIR"
  if wrapper_alive; then
    echo "worker.sh: a trainer is already running on $(host) (pid $(<"$PID_FILE")); " \
      "run 'tpu.sh stop' first" >&2
    exit 1
  fi
  rm -f "$EXIT_FILE" "$PID_FILE" "$TRAINER_PID_FILE" "$FAILURE_FILE"
  if [[ -f $LOG ]]; then
    mv -f "$LOG" "$LOG.prev"
  fi
  # setsid + nohup: the trainer must outlive the ssh session that started it, and gets its own
  # process group so `stop` can kill it together with its data-loader children.
  setsid nohup bash "$SELF" _train "$@" </dev/null >/dev/null 2>&1 &
  local i
  for ((i = 0; i < 100; i++)); do
    if [[ -f $PID_FILE ]]; then
      echo "TRECVIT_STARTED $(host) pid $(<"$PID_FILE") log $LOG"
      return 0
    fi
    sleep 0.1
  done
  echo "worker.sh: trainer wrapper did not start on $(host)" >&2
  exit 1
}

# The detached wrapper: runs the trainer, then records its exit status for the supervisor.
cmd__train() {
  local commit=unknown rc=0 child
  if [[ -f $RUN_DIR/src/.commit ]]; then
    commit=$(<"$RUN_DIR/src/.commit")
  fi
  {
    printf '# %s host=%s commit=%s\n# %q -m %q' \
      "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(host)" "$commit" "$PYTHON" "$MODULE"
    printf ' %q' "$@"
    printf '\n'
  } >>"$LOG"
  TRECVIT_FAILURE_FILE=$FAILURE_FILE "$PYTHON" -m "$MODULE" "$@" >>"$LOG" 2>&1 &
  child=$!
  echo "$child" >"$TRAINER_PID_FILE"
  # Ignore SIGTERM here (the child keeps its default disposition): on preemption the OS signals
  # every process, the trainer checkpoints and exits 42, and this wrapper must live long enough
  # to record that. `stop` signals the trainer itself.
  trap '' TERM INT
  echo "$$" >"$PID_FILE.tmp" && mv -f "$PID_FILE.tmp" "$PID_FILE"
  wait "$child" || rc=$?
  printf '# %s exit status %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$rc" >>"$LOG"
  # Atomic: the supervisor must never read a half-written file.
  echo "$rc" >"$EXIT_FILE.tmp" && mv -f "$EXIT_FILE.tmp" "$EXIT_FILE"
}

# Trainer processes not started by us (a manual run, a wrapper whose pid file was overwritten)
# hold the TPU just as well, so they are found by command line too.
stale_pids() {
  pgrep -f -- "-m ${MODULE}( |\$)" || true
}

cmd_stop() {
  local grace=${1:-120} pgid="" pids deadline
  if wrapper_alive; then
    pgid=$(<"$PID_FILE")
  fi
  pids=$(stale_pids)
  if [[ -f $TRAINER_PID_FILE ]]; then
    pids="$pids $(<"$TRAINER_PID_FILE")"
  fi
  # Once each: a second SIGTERM can land while Python is exiting from the first (handlers already
  # reset), killing it with 143 instead of letting it exit 42.
  pids=$(tr ' ' '\n' <<<"$pids" | sort -u)
  # SIGTERM first: the trainer saves a checkpoint on SIGTERM (and exits 42).
  for pid in $pids; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  deadline=$((SECONDS + grace))
  while ((SECONDS < deadline)); do
    if [[ -z $(stale_pids) ]] && { [[ -z $pgid ]] || ! kill -0 "$pgid" 2>/dev/null; }; then
      break
    fi
    sleep 1
  done
  if [[ -n $pgid ]]; then
    kill -KILL -- "-$pgid" 2>/dev/null || true
  fi
  for pid in $(stale_pids); do
    echo "worker.sh: SIGKILL $pid on $(host) after ${grace}s" >&2
    kill -KILL "$pid" 2>/dev/null || true
  done
  # libtpu refuses to start while this lock exists, and a killed process never removes it. It may
  # belong to another user (files in /tmp are sticky), hence sudo as the fallback.
  rm -f "$LOCKFILE" 2>/dev/null || sudo -n rm -f "$LOCKFILE" || true
  echo "TRECVIT_STOPPED $(host)"
}

cmd_logs() {
  local lines=${1:-100} follow=${2:-} prefix
  prefix="[$(host)] "
  if [[ ! -f $LOG ]]; then
    echo "${prefix}no log at $LOG"
    return 0
  fi
  if [[ $follow == follow ]]; then
    tail -n "$lines" -F "$LOG" | awk -v p="$prefix" '{ print p $0; fflush() }'
  else
    tail -n "$lines" "$LOG" | awk -v p="$prefix" '{ print p $0 }'
  fi
}

# Runs from RUN_DIR/src.new (just unpacked by tpu.sh): swap it in and install the pinned deps.
cmd_setup() {
  local commit=${1:?commit} python_version=${2:?python version} new uv versions
  new=$(cd "$(dirname "$SELF")/.." && pwd)
  if wrapper_alive; then
    echo "worker.sh: a trainer is running on $(host); run 'tpu.sh stop' before setup" >&2
    exit 1
  fi
  if [[ ! -f $new/constraints.txt ]]; then
    echo "worker.sh: constraints.txt missing at $commit: refusing an unpinned install" >&2
    exit 1
  fi
  if [[ $new != "$RUN_DIR/src" ]]; then
    rm -rf "$RUN_DIR/src"
    mv "$new" "$RUN_DIR/src"
  fi
  echo "$commit" >"$RUN_DIR/src/.commit"
  # uv gives us the Python version the project needs (TPU VM images ship an older python3
  # without the venv module) and installs much faster than pip.
  uv=$(command -v uv || echo "$HOME/.local/bin/uv")
  if [[ ! -x $uv ]]; then
    python3 -m pip install --user --quiet 'uv>=0.5,<1' ||
      python3 -m pip install --user --quiet --break-system-packages 'uv>=0.5,<1'
  fi
  "$uv" venv --quiet --allow-existing --python "$python_version" "$RUN_DIR/venv"
  (cd "$RUN_DIR/src" &&
    "$uv" pip install --quiet --python "$RUN_DIR/venv/bin/python" -c constraints.txt -e '.[tpu]')
  # Import check (not jax.devices(): that would grab the TPU); a broken install fails here.
  versions=$("$RUN_DIR/venv/bin/python" -c 'import jax; print("jax", jax.__version__)')
  echo "TRECVIT_SETUP $(host) commit $commit $versions"
}

main() {
  local cmd=${1:-}
  shift || true
  case $cmd in
    setup) cmd_setup "$@" ;;
    start) cmd_start "$@" ;;
    _train) cmd__train "$@" ;;
    status) cmd_status ;;
    stop) cmd_stop "$@" ;;
    logs) cmd_logs "$@" ;;
    -h | --help) usage ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
