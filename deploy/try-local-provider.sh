#!/usr/bin/env bash
# Exercise `ray up` / `ray exec` / `ray job` / `ray down` with deploy/onprem-pd.yaml (Ray's
# `local` provider) on ONE machine, where network namespaces play the hosts. Not run in CI:
# it needs root, sshd and rsync (apt-get install openssh-server rsync), and ~4 minutes.
#
#   sudo deploy/try-local-provider.sh          # from anywhere; prints each step
#
# "Hosts": head 10.231.1.10, prefill 10.231.1.11, decode 10.231.1.12, on a bridge in a fourth
# namespace that also holds the `ray up` client (10.231.1.1). Nothing is routed anywhere else.
# Each host runs its own sshd in its own network, PID and mount namespaces, with a private
# /root and /tmp: `ray stop` (run by ray up and ray down) then only sees that host's
# processes instead of every Ray process on the machine, and ~/.ray/auth_token, ~/.bashrc and
# the rsynced checkout stay inside the experiment. The real /root/.pyenv (Python, Ray, torch)
# and the converted default model are bind-mounted in, so nothing is downloaded.
#
# What differs from deploy/onprem-pd.yaml (rewritten into $WORK/cluster.yaml): the addresses,
# the SSH user/key, and setup_commands (the real ones build a venv and pip-install torch,
# Ray and pdserve on every host; here the machine's Python is used and PYTHONPATH points at
# the rsynced checkout). The start commands, the per-host role logic, the token file mount
# and the rest are used as written. The topology is configs/cluster-pd.yaml made CPU-sized.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=/var/tmp/pdserve-local-provider   # not under /tmp: each host mounts its own /tmp
NET=pdlpnet
declare -A HOST_IP=([H]=10.231.1.10 [P]=10.231.1.11 [D]=10.231.1.12)
CLIENT_IP=10.231.1.1
PY_HOME=$(python3 -c 'import sys; print(sys.prefix)')    # e.g. /root/.pyenv/versions/3.11.7
# The hosts get their own /root; if Python lives under /root, its top folder is mounted back.
PY_REL=${PY_HOME#/root/}
PY_TOP=${PY_REL%%/*}
[ "$PY_REL" != "$PY_HOME" ] || PY_TOP=""

log() { printf '\n=== %s\n' "$*" >&2; }

cleanup() {
  # Every process in these namespaces was started by this script.
  for ns in pdlpH pdlpP pdlpD "$NET"; do
    if ip netns list | grep -qw "$ns"; then
      for sig in TERM KILL; do
        pids=$(ip netns pids "$ns" || true)
        [ -n "$pids" ] && kill -s "$sig" $pids 2>/dev/null || true
        sleep 2
      done
      ip netns del "$ns" || true
    fi
  done
}

# Run a command as the `ray up` client: in the bridge namespace, with its own HOME and /tmp.
# Ray 2.60's `ray up` starts autoscaler v2 by default; with the local provider it launched one
# worker and then never the second (see docs/operations.md), so v1 unless AUTOSCALER_V2=1.
client() {
  ip netns exec "$NET" unshare --mount sh -c \
    'mount --bind "$0/client/tmp" /tmp && exec env HOME="$0/client/home" "$@"' "$WORK" \
    RAY_UP_enable_autoscaler_v2="${AUTOSCALER_V2:-0}" "$@"
}

make_host_dirs() {
  local h=$1 home=$WORK/$1/home
  mkdir -p "$home/.cache/pdserve" "$home/.ssh" "$WORK/$h/tmp"
  [ -z "$PY_TOP" ] || mkdir -p "$home/$PY_TOP"
  chmod 700 "$home"
  cat >"$home/.bashrc" <<EOF
export PATH="$PY_HOME/bin:\$PATH"
EOF
  echo '. ~/.bashrc' >"$home/.profile"
}

start_host() {
  # One "host": network namespace + PID namespace (private /proc) + mount namespace with the
  # host's own /root and /tmp, running sshd in the foreground as its init's child.
  local h=$1 home=$WORK/$1/home
  ip netns exec "pdlp$h" unshare --pid --fork --mount-proc sh -c '
    set -e
    [ -z "$0" ] || mount --bind "/root/$0" "$1/$0"
    [ ! -d /root/.cache/pdserve ] || mount --bind /root/.cache/pdserve "$1/.cache/pdserve"
    mount --rbind "$1" /root
    mount --bind "$2" /tmp
    exec /usr/sbin/sshd -D -e -f "$3/sshd_config" -o ListenAddress="$4"
  ' "$PY_TOP" "$home" "$WORK/$h/tmp" "$WORK" "${HOST_IP[$h]}" >"$WORK/$h/sshd.log" 2>&1 &
}

setup_network() {
  ip netns add "$NET"
  ip -n "$NET" link add br0 type bridge
  ip -n "$NET" addr add "$CLIENT_IP/24" dev br0
  ip -n "$NET" link set br0 up
  ip -n "$NET" link set lo up
  for h in H P D; do
    ip netns add "pdlp$h"
    ip link add "pdlp${h}e" type veth peer name "pdlp${h}b"
    ip link set "pdlp${h}e" netns "pdlp$h"
    ip link set "pdlp${h}b" netns "$NET"
    ip -n "$NET" link set "pdlp${h}b" master br0 up
    ip -n "pdlp$h" addr add "${HOST_IP[$h]}/24" dev "pdlp${h}e"
    ip -n "pdlp$h" link set "pdlp${h}e" up
    ip -n "pdlp$h" link set lo up
    # Like a real host's: Ray finds its node address from the route to a public address
    # (a UDP connect, nothing is sent); without one it falls back to the hostname, 127.0.x.x.
    # The bridge namespace has no uplink, so nothing could leave anyway.
    ip -n "pdlp$h" route add default via "$CLIENT_IP"
  done
}

setup_ssh() {
  ssh-keygen -q -t ed25519 -N '' -f "$WORK/host_key"
  ssh-keygen -q -t ed25519 -N '' -f "$WORK/client/home/.ssh/id_ed25519"
  cp "$WORK/client/home/.ssh/id_ed25519.pub" "$WORK/authorized_keys"
  mkdir -p /run/sshd   # sshd's privilege-separation directory
  cat >"$WORK/sshd_config" <<EOF
Port 22
HostKey $WORK/host_key
AuthorizedKeysFile $WORK/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
EOF
}

write_configs() {
  # The CPU-sized topology, and the cluster file with this experiment's addresses.
  python3 - "$REPO" "$WORK" "$CLIENT_IP" "${HOST_IP[H]}" "${HOST_IP[P]}" "${HOST_IP[D]}" <<'EOF'
import sys, yaml
repo, work, client, head, prefill, decode = sys.argv[1:]
topo = yaml.safe_load(open(f"{repo}/configs/cluster-pd.yaml"))
topo["model"] = {"device": "cpu", "dtype": "float32"}
topo["router"]["num_cpus"] = 0.1
for role in ("prefill", "decode"):
    topo[role]["engine"] = {"scheduler": {"max_num_seqs": 8, "max_num_batched_tokens": 64,
                                          "block_size": 16}, "cache": {"memory_mb": 64}}
    topo[role]["placement"].update(num_cpus=0.5, num_gpus=0)
yaml.safe_dump(topo, open(f"{work}/cluster-pd-cpu.yaml", "w"), sort_keys=False)

cfg = yaml.safe_load(open(f"{repo}/deploy/onprem-pd.yaml"))
cfg["cluster_name"] = "pdserve-nstest"
cfg["provider"].update(head_ip=head, worker_ips=[prefill, decode])
cfg["max_workers"] = 2
cfg["auth"] = {"ssh_user": "root", "ssh_private_key": f"{work}/client/home/.ssh/id_ed25519"}
cfg["file_mounts"]["~/pdserve"] = repo
cfg["file_mounts"]["~/cluster-pd-cpu.yaml"] = f"{work}/cluster-pd-cpu.yaml"
cfg["rsync_exclude"] += ["*.egg-info", ".pytest_cache", ".ruff_cache"]
cfg["setup_commands"] = [
    "grep -q RAY_AUTH_MODE ~/.bashrc || echo 'export RAY_AUTH_MODE=token' >> ~/.bashrc",
    "grep -q PYTHONPATH ~/.bashrc || echo 'export PYTHONPATH=$HOME/pdserve' >> ~/.bashrc",
    "python -c 'import ray, torch, cluster; print(\"ray\", ray.__version__, cluster.__file__)'",
]
start = cfg["worker_start_ray_commands"]
start[-1] = start[-1].replace('PREFILL_HOSTS="10.0.0.11 10.0.0.12"', f'PREFILL_HOSTS="{prefill}"')
assert prefill in start[-1]
yaml.safe_dump(cfg, open(f"{work}/cluster.yaml", "w"), sort_keys=False)
EOF
}

serve_and_check() {
  local cfg=$WORK/cluster.yaml url=""
  log "ray status on the head"
  client ray exec "$cfg" 'ray status'
  log "pdserve serve as a Ray job"
  client ray exec "$cfg" \
    'ray job submit --no-wait --submission-id pdserve-try -- pdserve serve ~/cluster-pd-cpu.yaml'
  for _ in $(seq 30); do
    url=$(client ray exec "$cfg" 'ray job logs pdserve-try' 2>/dev/null |
      sed -n 's#.*serving \(http://[^ ]*\)/v1.*#\1#p' | head -n1 || true)
    [ -n "$url" ] && break
    sleep 5
  done
  [ -n "$url" ] || { client ray exec "$cfg" 'ray job logs pdserve-try' || true; return 1; }
  log "router at $url"
  client ray exec "$cfg" "curl -s -w ' HTTP %{http_code}\n' $url/health"
  client ray exec "$cfg" "curl -s $url/v1/models; echo"
  client ray exec "$cfg" "curl -s $url/v1/completions -H 'Content-Type: application/json' \
    -d '{\"model\": \"SmolLM2-135M-Instruct\", \"prompt\": \"The capital of France is\", \
    \"max_tokens\": 8, \"temperature\": 0}'; echo"
  client ray exec "$cfg" 'pdserve status --address auto' || log "(pdserve status not available)"
  log "stop the job"
  client ray exec "$cfg" 'ray job stop pdserve-try; ray job status pdserve-try' || true
}

raylets_in() {
  local n=0 pid
  for pid in $(ip netns pids "pdlp$1"); do
    grep -qa raylet "/proc/$pid/cmdline" 2>/dev/null && n=$((n + 1))
  done
  echo "$n"
}

workers_after_down() {
  # The local provider's `ray down` runs `ray stop` on the head only; see how long the
  # workers' raylets outlive it.
  local t
  for t in $(seq 0 10 120); do
    log "${t}s after ray down: raylets on prefill host $(raylets_in P), decode host $(raylets_in D)"
    [ "$(raylets_in P)$(raylets_in D)" = "00" ] && return 0
    sleep 10
  done
}

main() {
  [ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 2; }
  for tool in ip unshare /usr/sbin/sshd rsync ssh ssh-keygen; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 2; }
  done
  cleanup
  rm -rf "$WORK"
  trap cleanup EXIT
  mkdir -p "$WORK/client/home/.ssh" "$WORK/client/tmp"
  for h in H P D; do make_host_dirs "$h"; done
  setup_ssh
  setup_network
  for h in H P D; do start_host "$h"; done
  sleep 1
  write_configs
  log "token for the cluster (client side; file_mounts copies it to every host)"
  client ray get-auth-token --generate >/dev/null
  log "ray up"
  SECONDS=0
  client ray up -y --no-config-cache "$WORK/cluster.yaml"
  log "ray up took ${SECONDS}s"
  local status=0
  serve_and_check || status=$?
  log "ray down"
  client ray down -y "$WORK/cluster.yaml"
  workers_after_down
  log "done (status $status)"
  return "$status"
}

main "$@"
