#!/usr/bin/env bash
# End-to-end test of the Slurm path on a real, private, one-node Slurm cluster on this machine.
#
#   bash tests/slurm/run_slurm_test.sh        (root; installs slurm-wlm and munge with apt-get if missing)
#
# 1. Installs Debian's slurm-wlm and munge when sbatch/slurmctld/slurmd/munged are missing.
# 2. Starts a private munged (own key and socket), slurmctld and slurmd (own slurm.conf, spool,
#    state and ports, all under a temporary folder; node "localhost" with this machine's CPUs,
#    select/cons_tres, proctrack/linuxproc, no cgroups, requeue delay cred_expire=10 s).
# 3. Makes a tiny tokenizer (train_bpe_tokenizer) and corpus (tools/preprocess_data.py).
# 4. Job 1: the quickstart config through tools/launch_slurm.py --wait (two CPU processes under
#    torchrun, gloo): must complete and leave its final checkpoint.
# 5. Job 2: a longer run; once it has written metrics it gets SIGUSR1 on its batch shell (what
#    --signal=B:USR1@T sends before the time limit). The trainer must save and exit with 75, the
#    job must requeue itself, restart and resume from the checkpoint it saved (start step > 0).
#    A few steps later an operator's `scontrol requeue` (SIGTERM to every process) must again
#    leave a checkpoint; the job is requeued once (by Slurm, not again by itself), resumes and
#    finishes with every step logged exactly once.
#
# Environment: NBDIFF_SLURM_PYTHON (default: the repository's .venv/bin/python), NBDIFF_SLURM_KEEP=1
# (keep the temporary folder), NBDIFF_SLURM_TMP (where to make it; default /tmp).
# Exit status 0 when everything passed; on failure the daemons' and jobs' logs are printed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${NBDIFF_SLURM_PYTHON:-$REPO/.venv/bin/python}"
export PATH="$PATH:/usr/sbin:/sbin"
cd "$REPO"
T0=$SECONDS
WORK=""
STARTED=()

say() { echo "[slurm-test $(date +%T) +$(( SECONDS - T0 ))s] $*"; }
fail() { echo "[slurm-test] FAIL: $*" >&2; exit 1; }

cleanup() {
    local rc=$?
    if [ -n "$WORK" ] && [ -f "$WORK/slurm.conf" ] && [ -f "$WORK/slurmctld.pid" ]; then
        local jobs
        jobs="$(squeue -h -o %i 2>/dev/null || true)"
        [ -n "$jobs" ] && scancel $jobs 2>/dev/null || true
    fi
    # stop the daemons this script started, newest first, by the pids they recorded
    local i pid
    for (( i=${#STARTED[@]}-1; i>=0; i-- )); do
        pid="$(cat "${STARTED[$i]}" 2>/dev/null || true)"
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    done
    if [ "$rc" != 0 ] && [ -n "$WORK" ]; then
        echo "---- logs (kept in $WORK) ----" >&2
        for f in "$WORK"/slurmctld.log "$WORK"/slurmd.log "$WORK"/run*/slurm/logs/*.out; do
            [ -f "$f" ] || continue
            echo "==== $f (last 60 lines)" >&2
            tail -n 60 "$f" | tr '\r' '\n' | tail -n 60 >&2
        done
    elif [ -n "$WORK" ] && [ "${NBDIFF_SLURM_KEEP:-0}" != 1 ]; then
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT

# ---- 1. Slurm and munge -------------------------------------------------------------------------
[ -x "$PY" ] || fail "no Python at $PY (make install, or set NBDIFF_SLURM_PYTHON)"
missing=()
for b in sbatch squeue scontrol scancel sinfo slurmctld slurmd munged munge; do
    command -v "$b" >/dev/null 2>&1 || missing+=("$b")
done
if [ "${#missing[@]}" -gt 0 ]; then
    [ "$(id -u)" = 0 ] || fail "missing ${missing[*]} and not root: install slurm-wlm and munge first"
    command -v apt-get >/dev/null 2>&1 || fail "missing ${missing[*]} and no apt-get to install slurm-wlm and munge"
    say "installing slurm-wlm and munge (missing: ${missing[*]})"
    t=$SECONDS
    apt-get update -qq >/dev/null || fail "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
        || fail "apt-get install slurm-wlm munge failed"
    say "installed in $(( SECONDS - t ))s"
fi
[ "$(id -u)" = 0 ] || fail "the private cluster runs its daemons and jobs as root: run as root"
say "$(slurmctld -V 2>/dev/null || echo 'slurm ?'), $(munged -V 2>/dev/null | head -n 1 || echo 'munge ?')"

# ---- 2. a private cluster -----------------------------------------------------------------------
WORK="$(mktemp -d "${NBDIFF_SLURM_TMP:-/tmp}/nbdiff-slurm.XXXXXX")"
chmod 755 "$WORK"                   # munged wants its socket folder searchable by everyone
mkdir -p "$WORK/munge-key" "$WORK/state" "$WORK/spool"
chmod 700 "$WORK/munge-key"
head -c 1024 /dev/urandom > "$WORK/munge-key/munge.key"
chmod 400 "$WORK/munge-key/munge.key"
munged --socket="$WORK/munge.socket" --key-file="$WORK/munge-key/munge.key" \
    --pid-file="$WORK/munged.pid" --log-file="$WORK/munged.log" --seed-file="$WORK/munge-key/seed" \
    || fail "munged did not start: $(tail -n 3 "$WORK/munged.log" 2>/dev/null)"
STARTED+=("$WORK/munged.pid")
munge --socket="$WORK/munge.socket" -n | unmunge --socket="$WORK/munge.socket" >/dev/null \
    || fail "munge round trip failed"

read -r CTLD_PORT SLURMD_PORT < <("$PY" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)
NCPU="$(nproc)"
JOB_CPUS=$(( NCPU < 2 ? NCPU : 2 ))
export SLURM_CONF="$WORK/slurm.conf"
cat > "$SLURM_CONF" <<EOF
ClusterName=nbdifftest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$WORK/munge.socket,cred_expire=10
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/slurmctld.log
SlurmdLogFile=$WORK/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# a requeued job starts as soon as it is eligible, not at the next default 30-60 s scheduling pass
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
InactiveLimit=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$NCPU State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
slurmctld -f "$SLURM_CONF" || fail "slurmctld did not start"
STARTED+=("$WORK/slurmctld.pid")
for _ in $(seq 1 50); do [ -s "$WORK/slurmctld.pid" ] && break; sleep 0.2; done
slurmd -f "$SLURM_CONF" -N localhost || fail "slurmd did not start"
STARTED+=("$WORK/slurmd.pid")
for _ in $(seq 1 50); do [ -s "$WORK/slurmd.pid" ] && break; sleep 0.2; done
state=""
for _ in $(seq 1 60); do
    state="$(sinfo -h -n localhost -o %t 2>/dev/null || true)"
    [ "$state" = idle ] && break
    sleep 0.5
done
[ "$state" = idle ] || fail "the node did not become idle (state '$state')"
say "cluster up: slurmctld :$CTLD_PORT, slurmd :$SLURMD_PORT, node localhost with $NCPU CPUs"

# ---- 3. a tiny tokenizer and corpus -------------------------------------------------------------
"$PY" - "$WORK" <<'EOF'
import json, random, sys
from megatron_nbdiff.data.make_tokenizer import train_bpe_tokenizer

work = sys.argv[1]
words = "the cat dog sat ran on mat park and watched a blue red big small tree house".split()
rng = random.Random(0)
docs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) for _ in range(400)]
train_bpe_tokenizer(docs, 300, f"{work}/tokenizer")
with open(f"{work}/corpus.jsonl", "w") as f:
    for doc in docs:
        f.write(json.dumps({"text": doc}) + "\n")
EOF
"$PY" -W ignore "$REPO/tools/preprocess_data.py" --input "$WORK/corpus.jsonl" --tokenizer "$WORK/tokenizer" \
    --output-prefix "$WORK/data/corpus" --quiet >/dev/null
[ -f "$WORK/data/corpus.bin" ] || fail "preprocessing wrote no dataset"
say "corpus ready"

CONFIG="$REPO/examples/slurm/configs/quickstart_tiny.yaml"
DATA=("data.train=[$WORK/data/corpus]" "data.tokenizer=$WORK/tokenizer" "train.eval_interval=0")
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
launch() {  # launch RUN_DIR JOB_NAME [launcher args and overrides...]
    local run="$1" name="$2"; shift 2
    # a free rendezvous port: the default (from the job id) would collide with a second private
    # cluster on this machine, whose job ids also start at 1
    (cd "$WORK" && "$PY" "$REPO/tools/launch_slurm.py" --config "$CONFIG" --nodes 1 --gpus-per-node 0 \
        --procs-per-node "$JOB_CPUS" --cpus-per-node "$JOB_CPUS" --output-dir "$run" --job-name "$name" \
        --master-port "$(free_port)" "$@" "${DATA[@]}")
}
job_field() {  # job_field JOB FIELD: a field of `scontrol show job`
    scontrol show job -o "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n 1
}

# ---- 4. job 1: a short run to completion --------------------------------------------------------
RUN1="$WORK/run1"
say "job 1: 6 steps, sbatch --wait"
set +e
J1="$(launch "$RUN1" nbdiff-quick --wait train.steps=6)"
RC1=$?
set -e
J1="$(echo "$J1" | head -n 1)"
[[ "$J1" =~ ^[0-9]+$ ]] || fail "job 1: launch_slurm.py printed no job id ('$J1', exit $RC1)"
[ "$RC1" = 0 ] || fail "job 1 ($J1) exited with $RC1"
[ "$(job_field "$J1" JobState)" = COMPLETED ] || fail "job 1: state $(job_field "$J1" JobState)"
"$PY" - "$RUN1" "$J1" <<'EOF'
import json, os, sys
run, job = sys.argv[1], sys.argv[2]
steps = [r["step"] for r in map(json.loads, open(f"{run}/metrics.jsonl")) if "loss" in r]
assert steps == list(range(6)), steps
latest = open(f"{run}/checkpoints/latest").read().strip()
assert latest == "step_0000006", latest
state = json.load(open(f"{run}/checkpoints/{latest}/trainer_state.json"))
assert state["step"] == 6, state["step"]
codes = {f: open(f"{run}/slurm/exit/{job}.0/{f}").read().strip() for f in os.listdir(f"{run}/slurm/exit/{job}.0")}
assert codes and set(codes.values()) == {"0"}, codes
log = open(f"{run}/slurm/logs/nbdiff-quick-{job}.out", errors="replace").read()
assert "run complete" in log, log[-2000:]
print(f"job 1: steps 0..5 logged, checkpoint {latest}, rank exit codes {sorted(codes.items())}")
EOF
say "job 1 ($J1) completed"

# ---- 5. job 2: preempted (SIGUSR1, then SIGTERM), requeued, resumed ----------------------------
RUN2="$WORK/run2"
STEPS2=120  # long enough that the operator's requeue comes before the end
J2="$(launch "$RUN2" nbdiff-preempt train.steps=$STEPS2 checkpoint.save_interval=0)" || fail "job 2: launch failed"
J2="$(echo "$J2" | head -n 1)"
[[ "$J2" =~ ^[0-9]+$ ]] || fail "job 2: launch_slurm.py printed no job id ('$J2')"
LOG2="$RUN2/slurm/logs/nbdiff-preempt-$J2.out"

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.25 s
    local limit="$1" what="$2" i st; shift 2
    for (( i = 0; i < limit * 4; i++ )); do
        "$@" && return 0
        if [ $(( i % 8 )) = 0 ]; then
            st="$(job_field "$J2" JobState)"
            case "$st" in
                COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE|PREEMPTED)
                    "$@" && return 0
                    fail "job 2 ended in state $st while waiting for: $what" ;;
            esac
        fi
        sleep 0.25
    done
    fail "job 2: no $what after $limit s"
}
logged_steps() { local n; n="$(grep -c '"loss"' "$RUN2/metrics.jsonl" 2>/dev/null || true)"; echo "${n:-0}"; }
resumed_at() {  # the step of the N-th "resumed from [PATH at ]step N" line of job 2's log
    tr '\r' '\n' < "$LOG2" 2>/dev/null | sed -n 's/^resumed from \(.* at \)\{0,1\}step \([0-9]*\)$/\2/p' | sed -n "${1}p"
}
started() { [ "$(logged_steps)" -ge 3 ]; }
resumed_once() { local k; k="$(resumed_at 1)"; [ -n "$k" ] && [ "$(logged_steps)" -ge $(( k + 3 )) ]; }
completed() { [ "$(job_field "$J2" JobState)" = COMPLETED ]; }

say "job 2 ($J2): $STEPS2 steps, waiting for its first metrics"
wait_for 180 "3 logged steps" started
say "job 2 logged $(logged_steps) steps: SIGUSR1 to its batch shell (as --signal=B:USR1@T before the time limit)"
scancel --batch --signal=USR1 "$J2"
wait_for 240 "resume after the SIGUSR1 requeue (and 3 more steps)" resumed_once
say "job 2 requeued itself (Restarts=$(job_field "$J2" Restarts)), resumed at step $(resumed_at 1), logged $(logged_steps) steps"
# an operator's requeue: Slurm sends SIGTERM to every process (SIGKILL KillWait=30 s later) and
# requeues the job itself; the trainer saves on SIGTERM, the batch shell must not requeue again
say "job 2: scontrol requeue (the SIGTERM path)"
scontrol requeue "$J2"
wait_for 300 "completion after the operator's requeue" completed
[ "$(job_field "$J2" Restarts)" = 2 ] || fail "job 2: Restarts=$(job_field "$J2" Restarts), expected 2"
[ "$(job_field "$J2" ExitCode)" = "0:0" ] || fail "job 2: ExitCode $(job_field "$J2" ExitCode)"
"$PY" - "$RUN2" "$J2" "$STEPS2" "$LOG2" <<'EOF'
import json, os, re, sys
run, job, steps, log_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
log = open(log_path, errors="replace").read().replace("\r", "\n")  # ranks interleave bytes
for needle in ("SIGUSR1 (time limit or preemption ahead)", "exit 75: checkpoint saved; requeueing job",
               "SIGTERM: the job is being cancelled, preempted or requeued by Slurm",
               "exit 75 after SIGTERM: checkpoint saved",
               f"job {job} start 0:", f"job {job} start 1:", f"job {job} start 2:", "run complete"):
    assert needle in log, (needle, log[-3000:])
assert log.count("requeueing job") == 1, "the batch shell requeued the job more than once"
resumed = [int(k) for k in re.findall(r"^resumed from (?:\S+ at )?step (\d+)$", log, re.M)]
assert len(resumed) == 2 and 3 <= resumed[0] < resumed[1] < steps, resumed


def codes(attempt):
    d = f"{run}/slurm/exit/{job}.{attempt}"
    return {f: open(f"{d}/{f}").read().strip() for f in os.listdir(d)}


assert set(codes(0).values()) == {"75"}, codes(0)   # SIGUSR1: every rank saved and exited 75
assert codes(1).get("rank-0") == "75", codes(1)     # SIGTERM: rank 0 saved and exited 75
assert codes(2) and set(codes(2).values()) == {"0"}, codes(2)
records = [r for r in map(json.loads, open(f"{run}/metrics.jsonl")) if "loss" in r]
logged = [r["step"] for r in records]
assert logged == list(range(steps)), logged  # every step exactly once: nothing lost, nothing redone
assert all(r["loss"] == r["loss"] for r in records)
saved = json.load(open(f"{run}/checkpoints/step_{resumed[1]:07d}/trainer_state.json"))
assert saved["step"] == resumed[1], saved["step"]
latest = open(f"{run}/checkpoints/latest").read().strip()
assert latest == f"step_{steps:07d}", latest
print(f"job 2: SIGUSR1 -> saved at step {resumed[0]}, exit 75, requeued itself, resumed; "
      f"SIGTERM (scontrol requeue) -> saved at step {resumed[1]}, requeued by Slurm, resumed; "
      f"finished at {steps}, steps 0..{steps - 1} logged once each")
EOF
say "job 2 ($J2) preempted twice, requeued and resumed"
say "PASS: slurm test took $(( SECONDS - T0 ))s"
