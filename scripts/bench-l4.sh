#!/usr/bin/env bash
# Side-by-side L4 benchmark: Portico's proxy (portico-local-cloud, release build) against
# Debian's haproxy in TCP mode, in one run, in front of the same targets, driven by the same
# client. Prints a Markdown table and writes it to bench-results/l4.md.
#
#   scripts/bench-l4.sh
#
# Everything runs on loopback, on addresses in 127.60.0.0/16 (no clash with the tests, which
# use 127.20-22.x and 127.90.x):
#
#   127.60.2.1-3:8080  nginx: the 3 targets. One nginx, `worker_processes auto`, no access log,
#                      keep-alive on; `/` answers "ok\n", `/1m` is a 1 MiB static file,
#                      `/who` names the address that answered (used to check round robin).
#   127.60.0.1:8900    portico-local-cloud's API; load balancers get 127.60.1.1-127.60.1.10.
#   127.60.1.1:80      Portico's proxy: one TCP listener on port 80, the 3 targets, a TCP probe
#                      every 2 s (2 failures down, 1 success up), no affinity, no PROXY
#                      header, no client-IP preservation. 2 proxy worker threads (and 2
#                      for the rest of the daemon).
#   127.60.3.1:80      haproxy, configured to do the same job:
#                        global:   nbthread 2 (the same 2-thread budget as Portico's runtime)
#                        defaults: mode tcp, balance roundrobin, timeout connect 3s (Portico's
#                                  connect timeout), timeout client/server 60s
#                        servers:  the 3 targets, `check inter 2s fall 2 rise 1` (a TCP connect
#                                  check at Portico's cadence)
#                      Nothing else is set: no logging (Portico logs nothing per connection at
#                      its default level either), default buffers. Neither proxy is tuned
#                      beyond its defaults. haproxy does not splice by default, where Portico
#                      moves bulk transfers in the kernel (splice(2)) on Linux;
#                      BENCH_HAPROXY_SPLICE=1 adds `option splice-auto`, haproxy's equivalent.
#
# The client is wrk with one thread. Each round runs three tests against the direct target
# (127.60.2.1:8080, the ceiling), Portico and haproxy, the two proxies alternating order from
# round to round; each run is preceded by a warm-up run of the same test. Per test:
#   keep-alive   wrk -c 64 http://LB/                          req/s, p50, p99
#   conn rate    wrk -c 32 -H 'Connection: close' http://LB/   connections/s, p50, p99
#                (every request is a new TCP connection through the proxy)
#   bulk         wrk -c 4 http://LB/1m                         Gbit/s of response bodies
# The table shows the median of the rounds per metric, plus the CPU time each proxy process
# used while measured (from /proc/PID/stat), since on a small machine client, proxy and
# targets share the same cores and a proxy that needs less CPU leaves more to the others.
# Two more rows show whether a proxy makes the others work harder: the CPU wrk and nginx
# used per request while it carried the traffic, and how busy the whole machine was (below
# 100 %, the run was bound by latency rather than CPU). A second table gives each round's
# Portico / haproxy ratio (both ran back to back, so the ratio is free of the drift between
# rounds), their geometric mean with a 95 % interval, and how many rounds Portico led: on a
# 2-core machine rounds swing by ±10 %, so a difference of a few per cent means something only
# when the interval leaves 1 out (BENCH_ROUNDS=15 BENCH_TESTS=connclose narrows it for one test).
#
# Other work on the machine skews such numbers, so the script watches for it: before each
# round it waits (up to 60 s) until other processes use at most BENCH_MAX_FOREIGN % (15) of
# the CPU, and during every measured run it compares the machine's busy time (/proc/stat)
# with what wrk, nginx and the proxies used; a run during which other processes took more is
# measured again (up to twice per run, 6 times per benchmark). What they took is reported.
# About 4 minutes on a quiet 2-core machine, after the build.
#
# Installs what is missing (haproxy, wrk, nginx-light or nginx, curl) with apt-get, keeping
# the packages' own services from starting (a Debian nginx would otherwise take *:80). Needs
# Rust (cargo) and root, or sudo for apt-get plus permission to bind port 80 (or set
# BENCH_LB_PORT to a port >= 1024). Stops every process it started and removes its temporary
# directory on exit.
#
# Knobs (environment): BENCH_ROUNDS (3), BENCH_TESTS ("keepalive connclose bulk": which tests,
# in that order; the tables keep only their rows), BENCH_DURATION (6 s per measured run; 3
# rounds of 10 s would take the run past 5 minutes), BENCH_WARMUP (2 s), BENCH_MAX_FOREIGN
# (15 %), BENCH_LB_PORT (80), BENCH_HAPROXY_SPLICE (0; 1 lets haproxy splice too),
# BENCH_WRK_CPU (CPU to pin wrk to; default: the last CPU when there are 4 or more, unpinned on
# smaller machines, where pinning would only take a core away from the proxy under test).
set -euo pipefail
cd "$(dirname "$0")/.."
root_dir=$PWD

rounds=${BENCH_ROUNDS:-3}
tests=${BENCH_TESTS:-keepalive connclose bulk}
for test in $tests; do
  case $test in
    keepalive | connclose | bulk) ;;
    *) echo "[bench-l4] error: unknown test '$test' in BENCH_TESTS (keepalive, connclose, bulk)" >&2 && exit 1 ;;
  esac
done
duration=${BENCH_DURATION:-6}
warmup=${BENCH_WARMUP:-2}
lb_port=${BENCH_LB_PORT:-80}
ka_conns=64
cc_conns=32
bulk_conns=4
api=127.60.0.1:8900
pool=127.60.1.1-127.60.1.10
backends=(127.60.2.1 127.60.2.2 127.60.2.3)
backend_port=8080
haproxy_addr=127.60.3.1
haproxy_splice=${BENCH_HAPROXY_SPLICE:-0}
proxy_threads=2
lb_name=benchl4

log() { printf '[bench-l4] %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

sudo_cmd=()
if [[ $EUID -ne 0 ]]; then
  sudo_cmd=(sudo)
fi

# ---------------------------------------------------------------------------------------------
# Processes, temporary files and clean-up

tmp=$(mktemp -d -t portico-bench-l4.XXXXXX)
pids=()
policy_rc_created=0

stop_pid() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "pid $pid ignored SIGTERM; killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? i
  trap - EXIT INT TERM
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    stop_pid "${pids[i]}"
  done
  rm -rf "$tmp"
  if [[ $policy_rc_created -eq 1 ]]; then
    "${sudo_cmd[@]}" rm -f /usr/sbin/policy-rc.d
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# Prerequisites

# A command from PATH or from the sbin directories a non-root PATH may lack.
find_bin() {
  local name=$1 dir
  if command -v "$name" >/dev/null 2>&1; then
    command -v "$name"
    return 0
  fi
  for dir in /usr/sbin /sbin /usr/local/sbin; do
    if [[ -x $dir/$name ]]; then
      echo "$dir/$name"
      return 0
    fi
  done
  return 1
}

# apt-get install, after one apt-get update, with service starts denied by policy-rc.d so the
# packages' own daemons (nginx on *:80) do not start. An existing policy-rc.d is left alone.
apt_install() {
  local rc=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    policy_rc_created=1
    printf '#!/bin/sh\n# bench-l4.sh: no service starts while it installs packages\nexit 101\n' |
      "${sudo_cmd[@]}" tee /usr/sbin/policy-rc.d >/dev/null
    "${sudo_cmd[@]}" chmod 755 /usr/sbin/policy-rc.d
  fi
  "${sudo_cmd[@]}" apt-get update -q || rc=$?
  if [[ $rc -eq 0 ]]; then
    # nginx-light is bookworm's smallest nginx; later releases only have nginx.
    local pkg pkgs=()
    for pkg in "$@"; do
      if [[ $pkg == nginx-light ]] && ! apt-cache show nginx-light >/dev/null 2>&1; then
        pkg=nginx
      fi
      pkgs+=("$pkg")
    done
    log "installing ${pkgs[*]}"
    "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}" || rc=$?
  fi
  if [[ $policy_rc_created -eq 1 ]]; then
    "${sudo_cmd[@]}" rm -f /usr/sbin/policy-rc.d
    policy_rc_created=0
  fi
  return "$rc"
}

missing=()
find_bin haproxy >/dev/null || missing+=(haproxy)
find_bin wrk >/dev/null || missing+=(wrk)
find_bin nginx >/dev/null || missing+=(nginx-light)
find_bin curl >/dev/null || missing+=(curl)
if [[ ${#missing[@]} -gt 0 ]]; then
  apt_install "${missing[@]}"
fi
haproxy_bin=$(find_bin haproxy) || die "haproxy is not installed"
wrk_bin=$(find_bin wrk) || die "wrk is not installed"
nginx_bin=$(find_bin nginx) || die "nginx is not installed"
command -v cargo >/dev/null || die "cargo is needed (install Rust with rustup)"

log "building portico-local-cloud (release)"
cargo build --release -p portico-local-cloud --locked
portico_bin=${CARGO_TARGET_DIR:-$root_dir/target}/release/portico-local-cloud
[[ -x $portico_bin ]] || die "no binary at $portico_bin"

ncpu=$(nproc)
wrk_cpu=${BENCH_WRK_CPU-}
if [[ -z ${BENCH_WRK_CPU+set} && $ncpu -ge 4 ]]; then
  wrk_cpu=$((ncpu - 1))
fi
wrk_cmd=("$wrk_bin")
if [[ -n $wrk_cpu ]]; then
  wrk_cmd=(taskset -c "$wrk_cpu" "$wrk_bin")
fi

# Fails unless the process started last is still running after a moment.
check_alive() {
  local pid=$1 name=$2 logfile=$3
  sleep 0.3
  if ! kill -0 "$pid" 2>/dev/null; then
    tail -n 20 "$logfile" >&2 || true
    die "$name exited at start (log above)"
  fi
}

# ---------------------------------------------------------------------------------------------
# Targets: nginx

# When started as root, nginx workers run as an unprivileged user and must read the files.
chmod 755 "$tmp"
mkdir -p "$tmp/www" "$tmp/nginx-tmp"
head -c 1048576 /dev/urandom >"$tmp/www/1m"
chmod 644 "$tmp/www/1m"

nginx_listens=""
for b in "${backends[@]}"; do
  nginx_listens+="    listen $b:$backend_port backlog=4096;"$'\n'
done
cat >"$tmp/nginx.conf" <<EOF
worker_processes auto;
worker_rlimit_nofile 16384;
daemon off;
pid $tmp/nginx.pid;
error_log $tmp/nginx-error.log warn;
events {
    worker_connections 4096;
}
http {
    access_log off;
    client_body_temp_path $tmp/nginx-tmp/body;
    proxy_temp_path $tmp/nginx-tmp/proxy;
    fastcgi_temp_path $tmp/nginx-tmp/fastcgi;
    uwsgi_temp_path $tmp/nginx-tmp/uwsgi;
    scgi_temp_path $tmp/nginx-tmp/scgi;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 75s;
    # Keep-alive connections stay open for the whole run (the default closes them after 1000
    # requests, which would add connection set-ups to the keep-alive test).
    keepalive_requests 10000000;
    server {
$nginx_listens        root $tmp/www;
        location = / { return 200 "ok\n"; }
        location = /1m { }
        location = /who { return 200 "\$server_addr\n"; }
    }
}
EOF
"$nginx_bin" -e "$tmp/nginx-error.log" -p "$tmp" -c "$tmp/nginx.conf" >"$tmp/nginx.out" 2>&1 &
nginx_pid=$!
pids+=("$nginx_pid")
check_alive "$nginx_pid" nginx "$tmp/nginx-error.log"

# ---------------------------------------------------------------------------------------------
# haproxy

{
  echo "global"
  echo "    nbthread $proxy_threads"
  echo "defaults"
  echo "    mode tcp"
  echo "    balance roundrobin"
  echo "    timeout connect 3s"
  echo "    timeout client 60s"
  echo "    timeout server 60s"
  echo "    default-server check inter 2s fall 2 rise 1"
  if [[ $haproxy_splice == 1 ]]; then
    echo "    option splice-auto"
  fi
  echo "listen bench"
  echo "    bind $haproxy_addr:$lb_port"
  i=1
  for b in "${backends[@]}"; do
    echo "    server nginx$i $b:$backend_port"
    i=$((i + 1))
  done
} >"$tmp/haproxy.cfg"
"$haproxy_bin" -c -q -f "$tmp/haproxy.cfg" || die "haproxy rejects $tmp/haproxy.cfg"
"$haproxy_bin" -db -f "$tmp/haproxy.cfg" >"$tmp/haproxy.log" 2>&1 &
haproxy_pid=$!
pids+=("$haproxy_pid")
check_alive "$haproxy_pid" haproxy "$tmp/haproxy.log"

# ---------------------------------------------------------------------------------------------
# Portico: the local cloud and one load balancer

RUST_LOG=info TOKIO_WORKER_THREADS=$proxy_threads PORTICO_LOCAL_CLOUD_PROXY_WORKERS=$proxy_threads "$portico_bin" \
  --listen "$api" --pool "$pool" --state-file "$tmp/local-cloud.json" >"$tmp/portico.log" 2>&1 &
portico_pid=$!
pids+=("$portico_pid")
check_alive "$portico_pid" portico-local-cloud "$tmp/portico.log"
for ((i = 0; ; i++)); do
  curl -fsS -o /dev/null "http://$api/healthz" 2>/dev/null && break
  kill -0 "$portico_pid" 2>/dev/null || die "portico-local-cloud exited: $(tail -n 5 "$tmp/portico.log")"
  [[ $i -lt 100 ]] || die "portico-local-cloud API not up after 10 s"
  sleep 0.1
done

targets_json=""
i=1
for b in "${backends[@]}"; do
  targets_json+="${targets_json:+,}{\"node\":\"nginx$i\",\"address\":\"$b\",\"port\":$backend_port}"
  i=$((i + 1))
done
spec=$(
  cat <<EOF
{
  "name": "$lb_name",
  "owner": {"clusterId": "bench-l4", "objectUid": "bench-l4", "objectRef": "Service/bench/l4"},
  "frontend": {
    "type": "network",
    "listeners": [{
      "name": "tcp-$lb_port",
      "protocol": "TCP",
      "port": $lb_port,
      "pool": {
        "targets": [$targets_json],
        "healthCheck": {
          "probe": {"type": "tcp", "port": $backend_port},
          "interval": 2000, "timeout": 2000, "healthyThreshold": 1, "unhealthyThreshold": 2
        },
        "affinity": {"type": "none"},
        "proxyProtocol": false,
        "preserveClientIp": false
      }
    }]
  }
}
EOF
)
status=$(curl -fsS -X PUT -H 'Content-Type: application/json' --data-binary "$spec" \
  "http://$api/v1/loadbalancers/$lb_name") || die "creating the load balancer failed"
portico_addr=$(sed -n 's/.*"ip":"\([^"]*\)".*/\1/p' <<<"$status")
[[ -n $portico_addr ]] || die "no address in the load balancer's status: $status"
if [[ $status == *'"error"'* ]]; then
  die "the load balancer does not serve port $lb_port: $status"
fi
log "Portico load balancer at $portico_addr:$lb_port, haproxy at $haproxy_addr:$lb_port"

# All 3 targets healthy, so round robin covers all of them from the first measured connection.
for ((i = 0; ; i++)); do
  healthy=$(curl -fsS "http://$api/metrics" | grep -c 'state="healthy"} 1$' || true)
  [[ $healthy -lt ${#backends[@]} ]] || break
  [[ $i -lt 100 ]] || die "Portico's targets not healthy after 10 s ($healthy healthy)"
  sleep 0.1
done

# ---------------------------------------------------------------------------------------------
# Both proxies do the same job: every new connection goes to the next of the 3 targets.

distribution() {
  local url=$1 n
  for ((n = 0; n < 3 * ${#backends[@]}; n++)); do
    curl -fsS "$url/who"
  done | sort | uniq -c | awk '{printf "%s%s×%s", sep, $2, $1; sep=", "}'
}
portico_spread=$(distribution "http://$portico_addr:$lb_port")
haproxy_spread=$(distribution "http://$haproxy_addr:$lb_port")
for spread in "$portico_spread" "$haproxy_spread"; do
  if [[ $(tr ',' '\n' <<<"$spread" | grep -c '×3$') -ne ${#backends[@]} ]]; then
    die "round robin check failed: 9 connections went to $spread"
  fi
done
log "round robin over 9 connections: Portico $portico_spread; haproxy $haproxy_spread"

# ---------------------------------------------------------------------------------------------
# Measuring

cat >"$tmp/report.lua" <<'EOF'
-- One machine-readable line per run: totals, latency percentiles (us), errors.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d bytes=%d p50_us=%d p99_us=%d errors=%d non2xx=%d\n",
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
EOF

clk_tck=$(getconf CLK_TCK)

# utime + stime of a process (all its threads), in clock ticks.
cpu_ticks() {
  local stat
  stat=$(<"/proc/$1/stat")
  stat=${stat##*") "}
  local -a f
  read -ra f <<<"$stat"
  echo $((f[11] + f[12]))
}

# Percentage of the whole machine's CPU time that was busy over $1 seconds.
busy_percent() {
  local -a a b
  read -ra a < <(head -n 1 /proc/stat)
  sleep "$1"
  read -ra b < <(head -n 1 /proc/stat)
  local total=0 idle i
  for ((i = 1; i <= 8; i++)); do
    total=$((total + b[i] - a[i]))
  done
  idle=$((b[4] - a[4] + b[5] - a[5]))
  echo $((total > 0 ? 100 * (total - idle) / total : 0))
}

# Waits (up to $1 s) until other processes use at most max_foreign % of the CPU (our own
# servers are idle between runs); prints the last busy percentage.
wait_for_quiet() {
  local busy i
  for ((i = 0; i < $1 / 2; i++)); do
    busy=$(busy_percent 2)
    if [[ $busy -le $max_foreign ]]; then
      break
    fi
    [[ $i -gt 0 ]] || log "other processes keep the CPU ${busy}% busy; waiting up to $1 s"
  done
  [[ $busy -le $max_foreign ]] || log "still ${busy}% busy; measuring anyway (see the table's notes)"
  echo "$busy"
}

# Busy and total clock ticks of the whole machine, into REPLY. Busy counts interrupt time too,
# as the kernel charges it to the process it interrupted (mostly network work for a server).
machine_ticks() {
  local -a c
  read -ra c < <(head -n 1 /proc/stat)
  REPLY="$((c[1] + c[2] + c[3] + c[6] + c[7])) $((c[1] + c[2] + c[3] + c[4] + c[5] + c[6] + c[7] + c[8]))"
}

# Clock ticks used by the servers (nginx and its workers, haproxy, Portico), into REPLY.
servers_ticks() {
  local pid sum=0
  for pid in "${server_pids[@]}"; do
    sum=$((sum + $(cpu_ticks "$pid")))
  done
  REPLY=$sum
}

# Clock ticks used by the children this shell has waited for (the wrk runs), into REPLY.
# `times` must run in this shell, not in a $(...) subshell, hence the file.
children_ticks() {
  local part ms=0
  times >"$tmp/times"
  for part in $(tail -n 1 "$tmp/times"); do
    [[ $part =~ ^([0-9]+)m([0-9]+)\.([0-9]+)s$ ]] || continue
    ms=$((ms + BASH_REMATCH[1] * 60000 + 10#${BASH_REMATCH[2]} * 1000 + 10#${BASH_REMATCH[3]}))
  done
  REPLY=$((ms * clk_tck / 1000))
}

# measure TEST TARGET URL CONNS [wrk args...]: a warm-up run, then the measured run. Sets
# `result` (wrk's RESULT line), `proxy_ticks` (-1 without a proxy), `foreign` (% of the
# machine's CPU time that went to processes other than wrk and the servers), `busy` (% of the
# machine's CPU time that was busy at all) and `rest_ticks` (what wrk and the targets used).
measure() {
  local target=$2 url=$3 conns=$4
  shift 4
  local pid=""
  case $target in
    portico) pid=$portico_pid ;;
    haproxy) pid=$haproxy_pid ;;
  esac
  "${wrk_cmd[@]}" -t1 -c"$conns" -d"${warmup}s" "$@" "$url" >/dev/null
  local before=0 after=0 out m0 m1 s0 s1 c0 c1
  [[ -z $pid ]] || before=$(cpu_ticks "$pid")
  machine_ticks && m0=$REPLY
  servers_ticks && s0=$REPLY
  children_ticks && c0=$REPLY
  out=$("${wrk_cmd[@]}" -t1 -c"$conns" -d"${duration}s" --latency -s "$tmp/report.lua" "$@" "$url")
  machine_ticks && m1=$REPLY
  servers_ticks && s1=$REPLY
  children_ticks && c1=$REPLY
  [[ -z $pid ]] || after=$(cpu_ticks "$pid")
  result=$(grep '^RESULT ' <<<"$out") || die "no result from wrk: $out"
  proxy_ticks=$((pid ? after - before : -1))
  local busy0=${m0% *} total0=${m0#* } busy1=${m1% *} total1=${m1#* }
  local others=$((busy1 - busy0 - (s1 - s0) - (c1 - c0)))
  foreign=$((others > 0 && total1 > total0 ? 100 * others / (total1 - total0) : 0))
  busy=$((total1 > total0 ? 100 * (busy1 - busy0) / (total1 - total0) : 0))
  # The idle proxy's few ticks (health checks) count with the targets.
  rest_ticks=$((s1 - s0 + c1 - c0 - (pid ? after - before : 0)))
}

# run_wrk TEST TARGET URL CONNS [wrk args...]: measures, again (up to twice, and 6 times per
# benchmark) while other processes took more than max_foreign % of the CPU; appends one line
# to $tmp/runs.tsv.
run_wrk() {
  local test=$1 target=$2 attempt
  for ((attempt = 1; ; attempt++)); do
    measure "$@"
    if [[ $foreign -le $max_foreign ]] || [[ $attempt -ge 3 ]] || [[ $repeats -ge 6 ]]; then
      break
    fi
    repeats=$((repeats + 1))
    log "round $round $test $target: other processes took ${foreign}% of the CPU; measuring again"
    if [[ $(wait_for_quiet 20) -gt $max_foreign ]]; then
      # The machine stays busy: measuring again would only take longer.
      repeats=6
    fi
  done
  local requests duration_us bytes p50 p99 errors non2xx
  read -r requests duration_us bytes p50 p99 errors non2xx < <(
    sed -e 's/^RESULT //' -e 's/[a-z0-9_]*=//g' <<<"$result"
  )
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$test" \
    "$target" "$requests" "$duration_us" "$bytes" "$p50" "$p99" "$errors" "$non2xx" \
    "$proxy_ticks" "$foreign" "$busy" "$rest_ticks" >>"$tmp/runs.tsv"
  log "round $round $test $target: $requests requests, p99 ${p99} us, errors $errors/$non2xx, others ${foreign}% CPU"
}

url_of() {
  case $1 in
    direct) echo "http://${backends[0]}:$backend_port" ;;
    portico) echo "http://$portico_addr:$lb_port" ;;
    haproxy) echo "http://$haproxy_addr:$lb_port" ;;
  esac
}

: >"$tmp/runs.tsv"
# nginx's workers: the processes whose parent is the nginx master.
server_pids=("$nginx_pid" "$haproxy_pid" "$portico_pid")
for stat_file in /proc/[0-9]*/stat; do
  { stat=$(<"$stat_file"); } 2>/dev/null || continue
  stat=${stat##*") "}
  read -ra fields <<<"$stat"
  if [[ ${fields[1]} == "$nginx_pid" ]]; then
    pid=${stat_file#/proc/}
    server_pids+=("${pid%/stat}")
  fi
done
max_foreign=${BENCH_MAX_FOREIGN:-15}
repeats=0
quiet_log=""
started=$(date +%s)
for ((round = 1; round <= rounds; round++)); do
  busy=$(wait_for_quiet 60)
  quiet_log+="${quiet_log:+, }round $round: ${busy}%"
  if ((round % 2)); then
    order=(direct portico haproxy)
  else
    order=(direct haproxy portico)
  fi
  for test in $tests; do
    for target in "${order[@]}"; do
      case $test in
        keepalive) run_wrk keepalive "$target" "$(url_of "$target")/" "$ka_conns" ;;
        connclose) run_wrk connclose "$target" "$(url_of "$target")/" "$cc_conns" -H 'Connection: close' ;;
        bulk) run_wrk bulk "$target" "$(url_of "$target")/1m" "$bulk_conns" ;;
      esac
    done
  done
done
elapsed=$(($(date +%s) - started))

# ---------------------------------------------------------------------------------------------
# Report

git_rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git status --porcelain -- providers 2>/dev/null) ]]; then
  git_rev+=" + uncommitted changes in providers/"
fi
cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
nginx_version=$("$nginx_bin" -v 2>&1 | head -n 1)
wrk_version=$("$wrk_bin" -v 2>&1 | head -n 1 | cut -d' ' -f1-2 || true)
wrk_pinning="not pinned"
if [[ -n $wrk_cpu ]]; then
  wrk_pinning="pinned to CPU $wrk_cpu"
fi

{
  echo "# L4 proxy benchmark: Portico vs haproxy"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- machine: $ncpu CPUs (${cpu_model:-unknown}), kernel $(uname -r)"
  echo "- Portico: \`$("$portico_bin" --version)\` at $git_rev; $proxy_threads proxy workers"
  echo "- haproxy: \`$("$haproxy_bin" -v | head -n 1)\`; nbthread $proxy_threads, mode tcp, balance roundrobin, TCP checks$([[ $haproxy_splice == 1 ]] && echo ', option splice-auto')"
  echo "- targets: \`$nginx_version\`, 3 addresses, \`worker_processes auto\`"
  echo "- client: \`$wrk_version\`, 1 thread, $wrk_pinning"
  echo "- rounds: $rounds, each run ${duration} s after a ${warmup} s warm-up of the same test; proxy order alternating; median of the rounds; ${elapsed} s in all"
  skewed=$(awk -F'\t' -v max="$max_foreign" '$12 > max' "$tmp/runs.tsv" | wc -l)
  if [[ $skewed -gt 0 ]]; then
    echo "- **WARNING: in $skewed of the $(wc -l <"$tmp/runs.tsv") measured runs other processes took more than ${max_foreign}% of the CPU (column \"others\"); those numbers are skewed. Run again on a quiet machine.**"
  fi
  echo "- CPU used by other processes: before each round (idle servers) $quiet_log; during the measured runs at most $(cut -f12 "$tmp/runs.tsv" | sort -n | tail -n 1)% (column \"others\" below); runs measured again because others took more than ${max_foreign}%: $repeats"
  echo
  awk -F'\t' -v clk="$clk_tck" -v ka="$ka_conns" -v cc="$cc_conns" -v bulk="$bulk_conns" '
    function median(key,    n, i, j, v, t) {
      n = count[key]
      for (i = 1; i <= n; i++) v[i] = vals[key, i]
      for (i = 2; i <= n; i++) {
        t = v[i]
        for (j = i - 1; j >= 1 && v[j] > t; j--) v[j + 1] = v[j]
        v[j + 1] = t
      }
      return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
    }
    function add(key, value) { vals[key, ++count[key]] = value }
    function lat(us) { return us < 1000 ? sprintf("%d µs", us) : sprintf("%.2f ms", us / 1000) }
    function fmt(kind, v) {
      if (kind == "rate") return sprintf("%.0f", v)
      if (kind == "lat") return lat(v)
      if (kind == "gbit") return sprintf("%.2f", v)
      if (kind == "pct") return sprintf("%.0f %%", v)
      if (kind == "us") return sprintf("%.1f µs", v)
      if (kind == "ms") return sprintf("%.2f ms", v)
      return v
    }
    # Portico relative to haproxy; "better" follows the direction of the metric; within 3 % is noise.
    function versus(p, h, higher_better,    d, word) {
      if (h == 0) return "—"
      d = 100 * (p - h) / h
      if (d > -3 && d < 3) word = "≈ same"
      else if ((d > 0) == higher_better) word = "Portico better"
      else word = "Portico worse"
      return sprintf("%+.0f %% (%s)", d, word)
    }
    # The two-sided 95 % quantile of the t distribution with df degrees of freedom.
    function t95(df) { return df <= 30 ? tq[df] : 1.96 }
    # The geometric mean of the per-round ratios, and a 95 % interval for it: a t interval
    # on the logarithms, the rounds being independent pairs. An interval that lies above 1
    # says Portico is ahead beyond the spread between rounds; one that holds 1 says level.
    function paired(test, label,    r, n, ahead, logsum, list, q, lq, mean, ss, i, half, ci) {
      n = 0; ahead = 0; logsum = 0; list = ""
      for (r = 1; r in rounds_seen; r++) {
        if (!((test, r, "portico") in perround) || !((test, r, "haproxy") in perround)) continue
        if (perround[test, r, "haproxy"] <= 0 || perround[test, r, "portico"] <= 0) continue
        q = perround[test, r, "portico"] / perround[test, r, "haproxy"]
        n++; lq[n] = log(q); logsum += lq[n]; if (q > 1) ahead++
        list = list (list == "" ? "" : ", ") sprintf("%.2f", q)
      }
      if (!n) return
      mean = logsum / n
      ci = "—"
      if (n > 1) {
        ss = 0
        for (i = 1; i <= n; i++) ss += (lq[i] - mean) ^ 2
        half = t95(n - 1) * sqrt(ss / (n - 1) / n)
        ci = sprintf("%.3f – %.3f", exp(mean - half), exp(mean + half))
      }
      printf "| %s | %s | %.3f | %s | %d of %d |\n", label, list, exp(mean), ci, ahead, n
    }
    function row(test, metric, label, kind, higher_better,    d, p, h) {
      if (!(test in ran)) return
      d = median(test "|direct|" metric)
      p = median(test "|portico|" metric)
      h = median(test "|haproxy|" metric)
      printf "| %s | %s | %s | %s | %s |\n", label,
        (count[test "|direct|" metric] ? fmt(kind, d) : "—"), fmt(kind, p), fmt(kind, h),
        versus(p, h, higher_better)
    }
    BEGIN {
      split("12.706 4.303 3.182 2.776 2.571 2.447 2.365 2.306 2.262 2.228 2.201 2.179 2.160 2.145 2.131 2.120 2.110 2.101 2.093 2.086 2.080 2.074 2.069 2.064 2.060 2.056 2.052 2.048 2.045 2.042", tq, " ")
    }
    {
      round = $1; test = $2; target = $3; requests = $4; secs = $5 / 1e6; bytes = $6
      ran[test] = 1
      k = test "|" target "|"
      add(k "rate", requests / secs)
      add(k "p50", $7)
      add(k "p99", $8)
      add(k "gbit", bytes * 8 / secs / 1e9)
      add(k "errors", $9 + $10)
      add(k "busy", $13)
      add(k "rest_per_req", 1e6 * $14 / clk / requests)
      if ($11 >= 0) {
        cpu = $11 / clk
        add(k "cpu", 100 * cpu / secs)
        add(k "cpu_per_req", 1e6 * cpu / requests)
        add(k "cpu_per_gb", 1e3 * cpu / (bytes / 1e9))
      }
      if (target != "direct") perround[test, round, target] = (test == "bulk" ? bytes : requests) / secs
      rounds_seen[round] = 1
      raw[++nraw] = sprintf("| %s | %s | %s | %.0f | %s | %s | %.2f | %s | %.1f µs | %s %% | %s | %s %% |",
        round, test, target, requests / secs, lat($7), lat($8), bytes * 8 / secs / 1e9,
        ($11 >= 0 ? sprintf("%.0f %%", 100 * $11 / clk / secs) : "—"),
        1e6 * $14 / clk / requests, $13, $9 + $10, $12)
    }
    END {
      print "| metric | direct to 1 target (ceiling) | Portico | haproxy | Portico vs haproxy |"
      print "|---|---|---|---|---|"
      if ("keepalive" in ran) printf "| **keep-alive** (`-c %d`, `/`) | | | | |\n", ka
      row("keepalive", "rate", "requests/s", "rate", 1)
      row("keepalive", "p50", "latency p50", "lat", 0)
      row("keepalive", "p99", "latency p99", "lat", 0)
      row("keepalive", "cpu", "proxy CPU (% of one core)", "pct", 0)
      row("keepalive", "cpu_per_req", "proxy CPU per request", "us", 0)
      row("keepalive", "rest_per_req", "wrk + targets CPU per request", "us", 0)
      row("keepalive", "busy", "machine busy (% of all CPUs)", "pct", 0)
      row("keepalive", "errors", "errors", "rate", 0)
      if ("connclose" in ran) printf "| **connection rate** (`-c %d`, `Connection: close`) | | | | |\n", cc
      row("connclose", "rate", "connections/s", "rate", 1)
      row("connclose", "p50", "latency p50", "lat", 0)
      row("connclose", "p99", "latency p99", "lat", 0)
      row("connclose", "cpu", "proxy CPU (% of one core)", "pct", 0)
      row("connclose", "cpu_per_req", "proxy CPU per connection", "us", 0)
      row("connclose", "rest_per_req", "wrk + targets CPU per connection", "us", 0)
      row("connclose", "busy", "machine busy (% of all CPUs)", "pct", 0)
      row("connclose", "errors", "errors", "rate", 0)
      if ("bulk" in ran) printf "| **bulk** (`-c %d`, `/1m`) | | | | |\n", bulk
      row("bulk", "gbit", "throughput, Gbit/s", "gbit", 1)
      row("bulk", "p99", "latency p99 (per 1 MiB)", "lat", 0)
      row("bulk", "cpu", "proxy CPU (% of one core)", "pct", 0)
      row("bulk", "cpu_per_gb", "proxy CPU per GB", "ms", 0)
      row("bulk", "errors", "errors", "rate", 0)
      print ""
      print "Errors are wrk socket errors (connect, read, write, timeout) plus non-2xx answers."
      print "\"≈ same\": Portico within ±3 % of haproxy. Latency and CPU: lower is better. The runs below show the spread between rounds;"
      print "\"others\" is the share of all CPU time that went to processes other than wrk, nginx and the two proxies during the run;"
      print "\"wrk + targets\" is the CPU the client and nginx used per request while that proxy carried the traffic: a proxy that"
      print "answers in larger batches lets them do more per wake-up. \"busy\" below 100 % means the run was bound by latency, not CPU."
      print ""
      print "Round by round (each round runs both proxies back to back, so their ratio is free of the drift between rounds):"
      print ""
      print "| test | Portico / haproxy per round | geometric mean | 95 % interval | rounds Portico ahead |"
      print "|---|---|---|---|---|"
      paired("keepalive", "keep-alive requests/s")
      paired("connclose", "connections/s")
      paired("bulk", "bulk throughput")
      print ""
      print "<details><summary>Every measured run</summary>"
      print ""
      print "| round | test | target | req/s | p50 | p99 | Gbit/s | proxy CPU | wrk + targets per req | busy | errors | others |"
      print "|---|---|---|---|---|---|---|---|---|---|---|---|"
      for (i = 1; i <= nraw; i++) print raw[i]
      print ""
      print "</details>"
    }
  ' "$tmp/runs.tsv"
} >"$tmp/l4.md"

mkdir -p bench-results
cp "$tmp/l4.md" bench-results/l4.md
cat bench-results/l4.md
log "written to bench-results/l4.md"
