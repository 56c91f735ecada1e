#!/usr/bin/env bash
# Create, set up, run and supervise trecvit-dist training on a Cloud TPU VM slice.
#
# Runs on your workstation and drives everything through gcloud; the worker-side half is
# launch/worker.sh, shipped to every worker by `setup`. See --help and the README section "Run on a TPU pod".
set -euo pipefail

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "tpu.sh needs bash >= 4.4 (macOS: brew install bash)" >&2
  exit 2
fi

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GCLOUD=${GCLOUD:-gcloud}  # tests substitute a fake
# Remote paths: the tilde is left for the worker's shell to expand.
# shellcheck disable=SC2088
REMOTE_WORKER='~/trecvit_run/src/launch/worker.sh'
REMOTE_TARBALL=trecvit_src.tar.gz  # relative to the remote home directory
LOCKFILE=/tmp/libtpu_lockfile

# Every flag has an environment variable; flags override the environment.
TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
WORKDIR=${WORKDIR:-}
CONFIG=${CONFIG:-}
SPOT=${SPOT:-0}
RESERVED=${RESERVED:-0}
QUEUED=${QUEUED:-1}
MAX_RETRIES=${MAX_RETRIES:-20}
BACKOFF=${BACKOFF:-60}
MAX_BACKOFF=${MAX_BACKOFF:-1800}
POLL_INTERVAL=${POLL_INTERVAL:-60}
STOP_GRACE=${STOP_GRACE:-120}
UNREACHABLE_LIMIT=${UNREACHABLE_LIMIT:-10}
WORKER=${WORKER:-all}
LOG_LINES=${LOG_LINES:-100}
FOLLOW=${FOLLOW:-1}
GIT_REF=${GIT_REF:-HEAD}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
DELETE_WHEN_DONE=${DELETE_WHEN_DONE:-0}
DRY_RUN=${DRY_RUN:-0}
EXTRA_ARGS=()

usage() {
  cat <<'EOF'
Usage: launch/tpu.sh COMMAND [--dry-run] [FLAGS] [-- TRAINER_ARGS...]

Commands:
  create     create the slice: a queued resource (default) or a plain TPU VM (--no-queued),
             on-demand, --spot or --reserved capacity
  setup      ship this repo at GIT_REF (git archive; uncommitted changes are NOT shipped) to every
             worker and install it with the pinned versions (constraints.txt, extra [tpu]) into
             ~/trecvit_run/venv (Python PYTHON_VERSION, via uv)
  run        start the trainer on every worker in the background (nohup), log to
             ~/trecvit_run/train.log on each worker, exit status to ~/trecvit_run/exit_code;
             TRAINER_ARGS after -- are passed through (e.g. --config.batch_size=512)
  supervise  keep the run going until it completes: create, setup and run as needed; on
             preemption (resource PREEMPTED/SUSPENDED/FAILED, or trainer exit 42) delete and
             re-create; on trainer failure (any other exit status) stop and re-run, unless it
             failed the same way (same step, same error) before: then stop for good. Every
             restart counts toward --max-retries, with exponential backoff between them.
  status     resource state and per-worker trainer state
  logs       tail the per-worker logs (prefixed with the worker's hostname)
  stop       stop the trainer on every worker (SIGTERM, SIGKILL after --grace), kill stale
             trainer processes and remove the TPU runtime lock (/tmp/libtpu_lockfile)
  delete     delete the slice (and its queued resource)

Flags (environment variable in brackets; flags win):
  --name NAME               [TPU_NAME]  slice name (also the queued resource id)
  --zone ZONE               [ZONE]
  --project PROJECT         [PROJECT]
  --accelerator-type TYPE   [ACCELERATOR_TYPE]  e.g. v5p-128, v5litepod-256, v6e-64, v4-32
  --runtime-version V       [RUNTIME_VERSION]  default from the type: v5p v2-alpha-tpuv5,
                            v5litepod v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e,
                            v4 tpu-ubuntu2204-base
  --workdir gs://...        [WORKDIR]  the run's identity: same workdir = resume
  --config FILE[:ARG]       [CONFIG]   e.g. configs/trecvit_k400.py:B
  --spot | --no-spot        [SPOT=1]   spot capacity (preemptible, much cheaper)
  --reserved | --no-reserved  [RESERVED=1]  use your reservation
  --queued | --no-queued    [QUEUED=0 for plain TPU VM]  default: queued resource
  --max-retries N           [MAX_RETRIES=20]  restarts allowed before supervise gives up
  --backoff SECONDS         [BACKOFF=60]  first retry delay, doubled per retry ...
  --max-backoff SECONDS     [MAX_BACKOFF=1800]  ... up to this
  --poll SECONDS            [POLL_INTERVAL=60]  how often supervise checks the slice
  --grace SECONDS           [STOP_GRACE=120]  SIGTERM-to-SIGKILL time for stop (checkpointing)
  --delete-when-done        [DELETE_WHEN_DONE=1]  supervise deletes the slice on completion
  --worker N|all            [WORKER=all]  which worker `logs` reads
  --lines N                 [LOG_LINES=100]; --no-follow [FOLLOW=0]: print and exit
  --ref GIT_REF             [GIT_REF=HEAD]  commit that setup ships
  --python-version V        [PYTHON_VERSION=3.11]
  --dry-run                 [DRY_RUN=1]  print every command (shell-quoted, one per line)
                            instead of running it; for supervise, the commands of one pass
  GCLOUD                    the gcloud binary (default: gcloud)

Trainer exit status (the contract between the trainer and supervise):
  0   run completed: total_steps reached, final checkpoint saved (also WORKDIR/COMPLETED)
  42  preempted: SIGTERM received, checkpoint saved; resume by running the same command
  1   failure (the trainer's last line says why; it records the step and a digest of the error
      in ~/trecvit_run/failure, which `status` shows as step=S error=D)
supervise exits 0 when the run completed, 1 when it gave up after --max-retries or when the
trainer failed twice at the same step with the same error (retrying cannot help).

Example: TRecViT-B on Kinetics-400, on a spot v5p-128 (16 workers):
  export TPU_NAME=trecvit-b ZONE=us-east5-a PROJECT=my-project ACCELERATOR_TYPE=v5p-128
  export WORKDIR=gs://my-bucket/runs/k400_b CONFIG=configs/trecvit_k400.py:B SPOT=1
  launch/tpu.sh supervise --dry-run           # see what it will do
  nohup launch/tpu.sh supervise -- --config.data.path=gs://my-bucket/data/k400 \
    > supervise.log 2>&1 &
  launch/tpu.sh logs                           # in another terminal
  # or step by step: create, setup, run -- --config.data.path=..., logs, stop, delete
EOF
}

die() {
  echo "tpu.sh: $*" >&2
  exit 2
}

# Shell-quote one word so that a POSIX shell reads it back unchanged (what shlex.split does too).
quote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

quote_words() {
  local out="" w
  for w in "$@"; do
    if [[ $w =~ ^(--[a-z-]+=)(.*)$ ]]; then
      # --command='...' reads better than '--command=...' and means the same.
      out+=" ${BASH_REMATCH[1]}$(quote "${BASH_REMATCH[2]}")"
    else
      out+=" $(quote "$w")"
    fi
  done
  printf '%s' "${out# }"
}

now() { date -u +%Y-%m-%dT%H:%M:%SZ; }
log() { printf '%s tpu.sh: %s\n' "$(now)" "$*" >&2; }

# Run a command, or print it in --dry-run. Commands that change something are echoed (to
# stderr) so supervise's log shows every action; polls use run_quiet.
# Dry-run output goes to fd 3, the script's stdout, so it shows even from inside $(...).
exec 3>&1
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote_words "$@")" >&3
    return 0
  fi
  log "+ $(quote_words "$@")"
  "$@"
}

run_quiet() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote_words "$@")" >&3
    return 0
  fi
  "$@"
}

set_flag() {
  local name=$1 value=$2
  case $name in
    --name) TPU_NAME=$value ;;
    --zone) ZONE=$value ;;
    --project) PROJECT=$value ;;
    --accelerator-type) ACCELERATOR_TYPE=$value ;;
    --runtime-version) RUNTIME_VERSION=$value ;;
    --workdir) WORKDIR=$value ;;
    --config) CONFIG=$value ;;
    --max-retries) MAX_RETRIES=$value ;;
    --backoff) BACKOFF=$value ;;
    --max-backoff) MAX_BACKOFF=$value ;;
    --poll) POLL_INTERVAL=$value ;;
    --grace) STOP_GRACE=$value ;;
    --worker) WORKER=$value ;;
    --lines) LOG_LINES=$value ;;
    --ref) GIT_REF=$value ;;
    --python-version) PYTHON_VERSION=$value ;;
    --spot) SPOT=$value ;;
    --reserved) RESERVED=$value ;;
    --queued) QUEUED=$value ;;
    --dry-run) DRY_RUN=$value ;;
    --delete-when-done) DELETE_WHEN_DONE=$value ;;
    *) die "unknown flag: $name (trainer arguments go after --)" ;;
  esac
}

parse_flags() {
  while (($# > 0)); do
    case $1 in
      --)
        shift
        EXTRA_ARGS=("$@")
        return 0
        ;;
      -h | --help)
        usage
        exit 0
        ;;
      --dry-run | --spot | --reserved | --queued | --delete-when-done) set_flag "$1" 1 ;;
      --no-spot | --no-reserved | --no-queued) set_flag "--${1#--no-}" 0 ;;
      --no-follow) FOLLOW=0 ;;
      --follow) FOLLOW=1 ;;
      --*=*) set_flag "${1%%=*}" "${1#*=}" ;;
      --*)
        (($# >= 2)) || die "$1 needs a value"
        set_flag "$1" "$2"
        shift
        ;;
      *) die "unexpected argument: $1 (trainer arguments go after --)" ;;
    esac
    shift
  done
}

# require VAR... : fail with the flag and environment variable to set.
require() {
  local var flag
  for var in "$@"; do
    if [[ -z ${!var} ]]; then
      case $var in
        TPU_NAME) flag=--name ;;
        *) flag=--$(tr '[:upper:]_' '[:lower:]-' <<<"$var") ;;
      esac
      die "missing $flag (or environment variable $var)"
    fi
  done
}

validate() {
  local var
  for var in SPOT RESERVED QUEUED DRY_RUN DELETE_WHEN_DONE FOLLOW; do
    [[ ${!var} == 0 || ${!var} == 1 ]] || die "$var must be 0 or 1, got '${!var}'"
  done
  for var in MAX_RETRIES LOG_LINES UNREACHABLE_LIMIT STOP_GRACE; do
    [[ ${!var} =~ ^[0-9]+$ ]] || die "$var must be a whole number, got '${!var}'"
  done
  for var in BACKOFF MAX_BACKOFF POLL_INTERVAL; do
    [[ ${!var} =~ ^[0-9]+([.][0-9]+)?$ ]] || die "$var must be a number of seconds, got '${!var}'"
  done
  if ((SPOT && RESERVED)); then
    die "--spot and --reserved are exclusive"
  fi
  if [[ -n $WORKDIR && $WORKDIR != gs://* ]]; then
    # Every worker must read and write the same checkpoints, and the slice's disks vanish when it
    # is deleted on preemption.
    die "WORKDIR must be a gs:// path, got '$WORKDIR'"
  fi
}

runtime_version() {
  if [[ -n $RUNTIME_VERSION ]]; then
    echo "$RUNTIME_VERSION"
    return
  fi
  case $ACCELERATOR_TYPE in
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) die "no default runtime version for '$ACCELERATOR_TYPE'; pass --runtime-version" ;;
  esac
}

# ssh_workers WORKER REMOTE_COMMAND [run|run_quiet]
ssh_workers() {
  local worker=$1 remote=$2 runner=${3:-run}
  # Host keys change whenever the slice is re-created under the same name; without this the
  # supervisor's first ssh after a re-create would stop at a "host key changed" error.
  "$runner" "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${LOC[@]}" --worker="$worker" \
    --strict-host-key-checking=no --quiet --command="$remote"
}

cmd_create() {
  require TPU_NAME ZONE PROJECT ACCELERATOR_TYPE
  local version capacity=()
  version=$(runtime_version)
  if ((SPOT)); then
    capacity=(--spot)
  elif ((RESERVED)); then
    capacity=(--reserved)
  fi
  if ((QUEUED)); then
    run "$GCLOUD" compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
      "${LOC[@]}" --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$version" \
      "${capacity[@]}"
  else
    run "$GCLOUD" compute tpus tpu-vm create "$TPU_NAME" "${LOC[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$version" "${capacity[@]}"
  fi
}

cmd_delete() {
  require TPU_NAME ZONE PROJECT
  if ((QUEUED)); then
    # --force: also delete the node the queued resource holds.
    run "$GCLOUD" compute tpus queued-resources delete "$TPU_NAME" "${LOC[@]}" --force --quiet
  else
    run "$GCLOUD" compute tpus tpu-vm delete "$TPU_NAME" "${LOC[@]}" --quiet
  fi
}

cmd_setup() {
  require TPU_NAME ZONE PROJECT
  # Called from supervise inside `if`, where set -e is off: every step checks explicitly.
  local commit tarball status remote
  commit=$(git -C "$REPO_ROOT" rev-parse --verify "${GIT_REF}^{commit}") ||
    die "not a commit: $GIT_REF"
  status=$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no)
  if [[ -n $status && $commit == "$(git -C "$REPO_ROOT" rev-parse HEAD)" ]]; then
    log "warning: uncommitted changes are not shipped; installing $commit"
  fi
  tarball=${TMPDIR:-/tmp}/trecvit_src_${commit:0:12}.tar.gz
  # Same commit on every worker, byte for byte: a tarball of the commit, not a clone that
  # might see a branch move between workers.
  run git -C "$REPO_ROOT" archive --format=tar.gz --output="$tarball" "$commit" || return
  run "$GCLOUD" compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$REMOTE_TARBALL" "${LOC[@]}" \
    --worker=all --strict-host-key-checking=no --quiet || return
  remote="rm -rf ~/trecvit_run/src.new && mkdir -p ~/trecvit_run/src.new"
  remote+=" && tar -xzf ~/$REMOTE_TARBALL -C ~/trecvit_run/src.new"
  remote+=" && bash ~/trecvit_run/src.new/launch/worker.sh setup"
  remote+=" $(quote_words "$commit" "$PYTHON_VERSION")"
  ssh_workers all "$remote" || return
  if ((!DRY_RUN)); then
    rm -f "$tarball"
  fi
}

# The trainer command line, quoted for the worker's shell. CONFIG and the pass-through args may
# hold ':' , spaces or quotes (--config.name='a b'); quote() makes them arrive intact.
trainer_args() {
  quote_words --config "$CONFIG" --workdir "$WORKDIR" "${EXTRA_ARGS[@]}"
}

cmd_run() {
  require TPU_NAME ZONE PROJECT WORKDIR CONFIG
  ssh_workers all "bash $REMOTE_WORKER start $(trainer_args)"
}

cmd_stop() {
  require TPU_NAME ZONE PROJECT
  local remote
  remote="if [ -f $REMOTE_WORKER ]; then bash $REMOTE_WORKER stop $(quote "$STOP_GRACE");"
  remote+=" else rm -f $LOCKFILE 2>/dev/null || sudo -n rm -f $LOCKFILE; fi"
  ssh_workers all "$remote"
}

cmd_logs() {
  require TPU_NAME ZONE PROJECT
  local follow=""
  if ((FOLLOW)); then
    follow=" follow"
  fi
  ssh_workers "$WORKER" "bash $REMOTE_WORKER logs $(quote "$LOG_LINES")$follow"
}

# --- resource and trainer state ------------------------------------------------------------

# Prints READY, MISSING, PENDING:<state>, BAD:<state> or ERROR:<message>.
resource_state() {
  local state
  if ((QUEUED)); then
    state=$(describe queued-resources "state.state") || return 0
    case $state in
      MISSING | ERROR:*) echo "$state" ;;
      ACTIVE)
        # The queued resource can be ACTIVE while its node is gone or preempted.
        state=$(describe tpu-vm state) || return 0
        case $state in
          MISSING) echo "BAD:ACTIVE_WITHOUT_NODE" ;;
          *) classify_node_state "$state" ;;
        esac
        ;;
      FAILED | SUSPENDING | SUSPENDED) echo "BAD:$state" ;;
      *) echo "PENDING:${state:-UNKNOWN}" ;;  # ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING...
    esac
  else
    state=$(describe tpu-vm state) || return 0
    case $state in
      MISSING | ERROR:*) echo "$state" ;;
      *) classify_node_state "$state" ;;
    esac
  fi
}

classify_node_state() {
  case $1 in
    READY) echo READY ;;
    PREEMPTED | TERMINATED | STOPPED | STOPPING | HIDDEN | HIDING | FAILED) echo "BAD:$1" ;;
    *) echo "PENDING:${1:-UNKNOWN}" ;;  # CREATING, STARTING, RESTARTING, REPAIRING, DELETING...
  esac
}

# describe (queued-resources|tpu-vm) FIELD: prints the field, MISSING, or ERROR:<message>.
describe() {
  local kind=$1 field=$2 out rc=0
  out=$(run_quiet "$GCLOUD" compute tpus "$kind" describe "$TPU_NAME" "${LOC[@]}" \
    --format="value($field)" 2>"$TMP/describe.err") || rc=$?
  if ((rc == 0)); then
    echo "$out"
  elif grep -q "NOT_FOUND" "$TMP/describe.err"; then
    echo MISSING
  else
    echo "ERROR:$(tr '\n' ' ' <"$TMP/describe.err" | cut -c1-300)"
  fi
}

# A worker that was never set up has no worker.sh yet: it is idle.
status_command() {
  # shellcheck disable=SC2016  # $(hostname) is for the worker's shell
  printf '%s' "if [ -f $REMOTE_WORKER ]; then bash $REMOTE_WORKER status;" \
    ' else echo "TRECVIT_STATUS $(hostname) idle"; fi'
}

# How the supervisor learns the trainer's fate: worker.sh records the exit status in
# ~/trecvit_run/exit_code on each worker; one ssh to all workers collects a
# `TRECVIT_STATUS HOST STATE [RC [step=S error=D]]` line from each. Prints one of UNREACHABLE,
# IDLE, RUNNING, COMPLETED, PREEMPTED, FAILED:<details> (details: HOST:exit=RC[@step=S,error=D]).
trainer_status() {
  local out rc=0 tag host state code detail n=0 idle=0 running=0 preempted=0 failed=""
  out=$(ssh_workers all "$(status_command)" run_quiet 2>"$TMP/status.err") || rc=$?
  while read -r tag host state code detail; do
    [[ $tag == TRECVIT_STATUS ]] || continue
    n=$((n + 1))
    case $state in
      idle) idle=$((idle + 1)) ;;
      running) running=$((running + 1)) ;;
      lost) failed+=" $host:lost" ;;
      exited)
        case $code in
          0) ;;
          42) preempted=$((preempted + 1)) ;;
          *)
            detail=${detail// /,}
            failed+=" $host:exit=${code:-?}${detail:+@$detail}"
            ;;
        esac
        ;;
      *) failed+=" $host:${state:-?}" ;;
    esac
  done <<<"$out"
  # A failure or a preemption on any worker decides, even if other workers did not answer: the
  # survivors are stuck in a collective. "All done" or "idle" needs every worker's answer.
  if [[ -n $failed ]]; then
    echo "FAILED:${failed# }"
  elif ((preempted > 0)); then
    echo PREEMPTED
  elif ((rc != 0 || n == 0)); then
    echo UNREACHABLE
  elif ((idle == n)); then
    echo IDLE
  elif ((idle > 0)); then
    echo "FAILED:trainer missing on $idle of $n workers"
  elif ((running > 0)); then
    echo RUNNING
  else
    echo COMPLETED
  fi
}

run_completed() {
  run_quiet "$GCLOUD" storage ls "$WORKDIR/COMPLETED" >/dev/null 2>&1
}

cmd_status() {
  require TPU_NAME ZONE PROJECT
  if ((DRY_RUN)); then
    resource_state >/dev/null
    trainer_status >/dev/null
    return 0
  fi
  echo "resource: $(resource_state)"
  ssh_workers all "$(status_command)" run_quiet
}

# --- supervise --------------------------------------------------------------------------------

failures=0
seen_failures=" "  # step=S,error=D of every trainer failure so far
launched=0     # whether this supervisor started the trainer on the current slice
setup_done=0   # whether this supervisor ran setup on the current slice

# Count a restart; give up after MAX_RETRIES; otherwise back off exponentially.
retry() {
  failures=$((failures + 1))
  if ((failures > MAX_RETRIES)); then
    log "supervise: $* -- giving up after $MAX_RETRIES retries"
    exit 1
  fi
  local delay
  delay=$(awk -v b="$BACKOFF" -v n="$failures" -v m="$MAX_BACKOFF" \
    'BEGIN { d = b * 2 ^ (n - 1); if (d > m) d = m; print d }')
  log "supervise: $* -- retry $failures/$MAX_RETRIES in ${delay}s"
  sleep "$delay"
}

launch() {
  if ((!setup_done)); then
    log "supervise: setting up the workers"
    if ! cmd_setup; then
      retry "setup failed"
      return
    fi
    setup_done=1
  fi
  log "supervise: starting the trainer"
  launched=1  # even if the ssh failed part-way: the next status poll sorts it out
  if ! cmd_run; then
    retry "starting the trainer failed"
  fi
}

# A failure (FAILED:<details>) whose step and error were seen before: sets `repeated` to it and
# succeeds. The same error at the same step twice is deterministic (bad data, a bug, a config
# error): retrying only burns the retries. Not called in a $(...) subshell: it must remember.
repeated=""
repeated_failure() {
  local word
  repeated=""
  for word in $1; do
    [[ $word == *@step=* ]] || continue
    if [[ $seen_failures == *" ${word#*@} "* ]]; then
      repeated=${word#*@}
    fi
  done
  for word in $1; do
    [[ $word == *@step=* ]] && seen_failures+="${word#*@} "
  done
  [[ -n $repeated ]]
}

forget_slice() {
  launched=0
  setup_done=0
}

show_log_tails() {
  ssh_workers all "bash $REMOTE_WORKER logs 20" run_quiet || true
}

finish() {
  if ((DELETE_WHEN_DONE)); then
    log "supervise: deleting the slice (--delete-when-done)"
    cmd_delete || log "supervise: delete failed; delete it yourself: launch/tpu.sh delete"
  fi
  log "supervise: run completed"
  exit 0
}

# --dry-run: the commands of one pass from nothing to a running trainer, plus the recovery ones.
supervise_plan() {
  run_completed || true
  resource_state >/dev/null
  cmd_create
  cmd_setup
  cmd_run
  trainer_status >/dev/null
  cmd_stop
  cmd_delete
}

cmd_supervise() {
  require TPU_NAME ZONE PROJECT ACCELERATOR_TYPE WORKDIR CONFIG
  if ((DRY_RUN)); then
    supervise_plan
    return 0
  fi
  local state status last_state="" last_status="" unreachable=0 completed_seen="" repeated
  RUNTIME_VERSION=$(runtime_version)  # fail now, not at the first re-create days from now
  # Every re-create must install the same code, even if the checkout moves meanwhile.
  GIT_REF=$(git -C "$REPO_ROOT" rev-parse --verify "${GIT_REF}^{commit}") ||
    die "not a commit: $GIT_REF"
  log "supervise: $TPU_NAME ($ACCELERATOR_TYPE, $ZONE, $PROJECT) workdir $WORKDIR config $CONFIG;" \
    "commit ${GIT_REF:0:12}; max retries $MAX_RETRIES, backoff ${BACKOFF}s..${MAX_BACKOFF}s," \
    "poll ${POLL_INTERVAL}s"
  if run_completed; then
    log "supervise: $WORKDIR/COMPLETED exists"
    finish
  fi
  while :; do
    state=$(resource_state)
    if [[ $state != "$last_state" ]]; then
      log "supervise: resource state $state"
      last_state=$state
    fi
    case $state in
      MISSING)
        forget_slice
        log "supervise: creating the slice"
        if ! cmd_create; then
          retry "create failed"
        fi
        ;;
      PENDING:* | ERROR:*)
        sleep "$POLL_INTERVAL"
        ;;
      BAD:*)
        log "supervise: slice is ${state#BAD:}: deleting it to re-create"
        cmd_delete || log "supervise: delete failed; will look again"
        forget_slice
        retry "slice ${state#BAD:}"
        ;;
      READY)
        status=$(trainer_status)
        if [[ $status != "$last_status" ]]; then
          log "supervise: trainer $status"
          last_status=$status
        fi
        if [[ $status == UNREACHABLE ]]; then
          unreachable=$((unreachable + 1))
          log "supervise: workers unreachable ($unreachable/$UNREACHABLE_LIMIT):" \
            "$(tail -n 2 "$TMP/status.err" 2>/dev/null | tr '\n' ' ')"
          if ((unreachable >= UNREACHABLE_LIMIT)); then
            unreachable=0
            log "supervise: giving up on this slice: deleting it to re-create"
            cmd_delete || log "supervise: delete failed; will look again"
            forget_slice
            retry "workers unreachable"
          else
            sleep "$POLL_INTERVAL"
          fi
          continue
        fi
        unreachable=0
        if ((!launched)) && [[ $status != RUNNING ]]; then
          # A fresh slice, or results left over from before this supervisor started: the
          # workdir decides what happens next (resume), so just (re)start.
          launch
          continue
        fi
        case $status in
          RUNNING)
            if ((!launched)); then
              log "supervise: adopting the trainer already running on $TPU_NAME"
              launched=1
            fi
            # A trainer stuck at exit (e.g. in a shutdown barrier) after writing COMPLETED
            # must not keep the slice forever.
            if [[ -z $completed_seen ]] && run_completed; then
              completed_seen=$SECONDS
              log "supervise: $WORKDIR/COMPLETED exists; waiting ${STOP_GRACE}s for the trainer to exit"
            elif [[ -n $completed_seen ]] && ((SECONDS - completed_seen >= STOP_GRACE)); then
              log "supervise: trainer still running after COMPLETED; stopping it"
              cmd_stop || true
              finish
            fi
            sleep "$POLL_INTERVAL"
            ;;
          COMPLETED)
            log "supervise: trainer exited 0 on every worker"
            finish
            ;;
          PREEMPTED)
            # SIGTERM on a TPU VM means the host is being preempted or maintained; a fresh
            # slice is the only state known to be good.
            log "supervise: trainer preempted (exit 42): deleting the slice to re-create"
            cmd_delete || log "supervise: delete failed; will look again"
            forget_slice
            retry "preempted"
            ;;
          FAILED:*)
            log "supervise: trainer failed (${status#FAILED:}); last log lines:"
            show_log_tails >&2
            cmd_stop || true
            if repeated_failure "${status#FAILED:}"; then
              log "supervise: the trainer failed the same way twice ($repeated): retrying" \
                "cannot help; not retrying. Fix the cause (see the log lines above), then run" \
                "supervise again."
              exit 1
            fi
            retry "trainer failed"
            launch
            ;;
          IDLE)
            # No trace of a run on any worker: the slice was replaced behind our back.
            log "supervise: trainer vanished; setting up and starting it again"
            forget_slice
            retry "trainer missing"
            launch
            ;;
        esac
        ;;
    esac
  done
}

main() {
  if (($# == 0)); then
    usage >&2
    exit 2
  fi
  local cmd=$1
  shift
  case $cmd in
    -h | --help | help)
      usage
      exit 0
      ;;
  esac
  parse_flags "$@"
  validate
  LOC=(--zone="$ZONE" --project="$PROJECT")
  TMP=$(mktemp -d "${TMPDIR:-/tmp}/trecvit_tpu.XXXXXX")
  trap 'rm -rf "$TMP"' EXIT
  case $cmd in
    create) cmd_create ;;
    setup) cmd_setup ;;
    run) cmd_run ;;
    supervise) cmd_supervise ;;
    status) cmd_status ;;
    logs) cmd_logs ;;
    stop) cmd_stop ;;
    delete) cmd_delete ;;
    *) die "unknown command: $cmd (see --help)" ;;
  esac
}

main "$@"
