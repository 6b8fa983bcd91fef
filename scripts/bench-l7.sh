#!/usr/bin/env bash
# Side-by-side L7 benchmark: Portico's HTTP(S) proxy (portico-local-cloud, release build)
# against Debian's nginx as a reverse proxy doing the same job, in one run, in front of the
# same targets, driven by the same client. Prints a Markdown table and writes it to
# bench-results/l7.md.
#
#   scripts/bench-l7.sh
#
# Everything runs on loopback, on addresses in 127.61.0.0/16 (nothing else in the project
# uses that range; the L4 benchmark uses 127.60.x):
#
#   127.61.2.1-3:8080  nginx: the 3 targets. One nginx, `worker_processes auto`, no access
#                      log, keep-alive on; `/` answers "ok\n", `/who` names the address that
#                      answered (to check round robin), `/echo` the forwarding headers it got
#                      (to check both proxies send the same). 127.61.2.1:8443 serves the same
#                      over TLS with the benchmark's certificate: the HTTPS ceiling.
#   127.61.0.1:8900    portico-local-cloud's API; load balancers get 127.61.1.1-127.61.1.10.
#   127.61.1.1:80/443  Portico's proxy: an application load balancer, HTTP on 80, HTTPS on 443
#                      with one certificate for bench.example (also its default certificate),
#                      one host rule `bench.example` prefix `/` -> backend `web` (the 3
#                      targets, a TCP probe every 2 s, 2 failures down, 1 success up, no
#                      affinity), default timeouts (connect 5 s, request 60 s, idle 60 s).
#                      It forwards the client's Host, appends the client to X-Forwarded-For
#                      and sets X-Forwarded-Proto and X-Forwarded-Host; targets are reached
#                      over pooled HTTP/1.1 keep-alive connections. 2 proxy workers (one
#                      single-threaded runtime each; --proxy-workers), the API and health
#                      checks on a tokio runtime of 2 threads beside them.
#   127.61.3.1:80/443  nginx as the peer reverse proxy, a separate instance configured to do
#                      the same job:
#                        worker_processes 2 (the same 2-core budget as Portico's runtime),
#                        worker_connections 4096, access_log off
#                        upstream: the 3 targets (round robin, per worker: no `zone`), keepalive 64,
#                                  keepalive_requests 10000000
#                        server:   server_name bench.example, default_server;
#                                  listen :80, and :443 ssl (no http2: wrk speaks HTTP/1.1, and
#                                  without ALPN Portico answers HTTP/1.1 too); the same
#                                  certificate; ssl_protocols TLSv1.2 TLSv1.3; other TLS
#                                  settings at nginx's defaults (session tickets on, no
#                                  session cache)
#                        proxying: proxy_pass http://upstream; proxy_http_version 1.1;
#                                  proxy_set_header Connection "";
#                                  Host $http_host (the client's, as Portico forwards it);
#                                  X-Forwarded-For $proxy_add_x_forwarded_for;
#                                  X-Forwarded-Proto $scheme; X-Forwarded-Host $http_host;
#                                  proxy_connect_timeout 5s, proxy_read/send_timeout 60s
#                                  (Portico's defaults); keepalive_timeout 60s (Portico's idle
#                                  timeout); keepalive_requests 10000000 towards clients too
#                                  (nginx's default of 1000 would close the benchmark's
#                                  connections mid-run; Portico has no such limit)
#                      Not matched: open-source nginx has no active health checks (only
#                      passive max_fails), so it spends nothing on probes; Portico's probes
#                      (3 TCP connects every 2 s) are in its CPU figures. Response buffering
#                      stays at nginx's default (on); for a 3-byte body it makes no difference.
#                      Neither proxy is tuned beyond this.
#
# Before measuring, the script checks that both proxies spread 9 requests over all 3 targets
# (Portico exactly 3/3/3; nginx's workers each keep their own round robin) and deliver
# identical forwarding headers over HTTP and HTTPS.
#
# The client is wrk with one thread. wrk is pointed at http(s)://bench.example:PORT/ and a
# small Lua script overrides wrk's name lookup with the address under test, so Host and TLS
# SNI are both "bench.example" without touching /etc/hosts. Each round runs every test
# against the direct target (the ceiling), Portico and nginx, the two proxies alternating
# order from round to round; each run is preceded by a warm-up run of the same test. Per
# test (all with -H 'Host: bench.example'):
#   http        wrk -c 64 http://bench.example/            requests/s, p50, p99
#   https       wrk -c 64 https://bench.example/           requests/s, p50, p99
#   handshake   wrk -c 32 -H 'Connection: close' https://bench.example/
#               every request is a new TCP connection and TLS handshake; wrk keeps the TLS
#               session of its previous connection, so a server that offers resumption
#               (both do by default, TLS 1.3 tickets) gets resumed handshakes: the table says
#               what each negotiated.
# The table shows the median of the rounds per metric, plus the CPU time each proxy's
# processes used while measured (from /proc/PID/stat; for nginx its master and workers),
# since on a small machine client, proxy and targets share the same cores and a proxy that
# needs less CPU leaves more to the others.
#
# Other work on the machine skews such numbers, so the script watches for it: before the
# first round it waits (up to BENCH_LOAD_WAIT s) for the 1-minute load average to drop below
# BENCH_MAX_LOAD; before each round it waits (up to 60 s) until other processes use at most
# BENCH_MAX_FOREIGN % of the CPU; during every measured run it compares the machine's busy
# time (/proc/stat) with what wrk, the nginx instances and Portico used, and a run during
# which other processes took more is measured again (up to twice per run, 6 times per
# benchmark). What they took is reported. About 4 minutes on a quiet 2-core machine, after
# the build.
#
# Installs what is missing (wrk, nginx-light or nginx, curl, openssl, jq) with apt-get,
# keeping the packages' own services from starting (a Debian nginx would otherwise take
# *:80). Needs Rust (cargo) and root, or sudo for apt-get plus permission to bind ports 80
# and 443 (or set BENCH_HTTP_PORT / BENCH_HTTPS_PORT to ports >= 1024). Stops every process
# it started and removes its temporary directory on exit.
#
# Knobs (environment): BENCH_ROUNDS (3), BENCH_TESTS ("http https handshake": which tests, in
# that order; the table keeps only their rows), BENCH_DURATION (6 s per measured run), BENCH_WARMUP
# (2 s), BENCH_MAX_FOREIGN (15 %), BENCH_MAX_LOAD (1.0), BENCH_LOAD_WAIT (120 s; 0 skips the
# wait), BENCH_HTTP_PORT (80), BENCH_HTTPS_PORT (443), BENCH_WRK_CPU (CPU to pin wrk to;
# default: the last CPU when there are 4 or more, unpinned on smaller machines, where pinning
# would only take a core away from the proxy under test).
set -euo pipefail
cd "$(dirname "$0")/.."
root_dir=$PWD

rounds=${BENCH_ROUNDS:-3}
tests=${BENCH_TESTS:-http https handshake}
duration=${BENCH_DURATION:-6}
warmup=${BENCH_WARMUP:-2}
http_port=${BENCH_HTTP_PORT:-80}
https_port=${BENCH_HTTPS_PORT:-443}
max_load=${BENCH_MAX_LOAD:-1.0}
load_wait=${BENCH_LOAD_WAIT:-120}
ka_conns=64
hs_conns=32
api=127.61.0.1:8900
pool=127.61.1.1-127.61.1.10
backends=(127.61.2.1 127.61.2.2 127.61.2.3)
backend_port=8080
backend_tls_port=8443
nginx_proxy_addr=127.61.3.1
proxy_threads=2
lb_name=benchl7
host=bench.example

log() { printf '[bench-l7] %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# ---------------------------------------------------------------------------------------------
# Prerequisites

sudo_cmd=()
if [[ $EUID -ne 0 ]]; then
  sudo_cmd=(sudo)
fi

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
  local created=0 rc=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\n# bench-l7.sh: no service starts while it installs packages\nexit 101\n' |
      "${sudo_cmd[@]}" tee /usr/sbin/policy-rc.d >/dev/null
    "${sudo_cmd[@]}" chmod 755 /usr/sbin/policy-rc.d
    created=1
  fi
  "${sudo_cmd[@]}" apt-get update -q || rc=$?
  if [[ $rc -eq 0 ]]; then
    # nginx-light is bookworm's smallest nginx (with ssl and upstream keepalive); later
    # releases only have nginx.
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
  if [[ $created -eq 1 ]]; then
    "${sudo_cmd[@]}" rm -f /usr/sbin/policy-rc.d
  fi
  return "$rc"
}

missing=()
find_bin wrk >/dev/null || missing+=(wrk)
find_bin nginx >/dev/null || missing+=(nginx-light)
find_bin curl >/dev/null || missing+=(curl)
find_bin openssl >/dev/null || missing+=(openssl)
find_bin jq >/dev/null || missing+=(jq)
if [[ ${#missing[@]} -gt 0 ]]; then
  apt_install "${missing[@]}"
fi
wrk_bin=$(find_bin wrk) || die "wrk is not installed"
nginx_bin=$(find_bin nginx) || die "nginx is not installed"
openssl_bin=$(find_bin openssl) || die "openssl is not installed"
find_bin curl >/dev/null || die "curl is not installed"
find_bin jq >/dev/null || die "jq is not installed"
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

# ---------------------------------------------------------------------------------------------
# Processes, temporary files and clean-up

tmp=$(mktemp -d -t portico-bench-l7.XXXXXX)
pids=()

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
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Fails unless the process started last is still running after a moment.
check_alive() {
  local pid=$1 name=$2 logfile=$3
  sleep 0.3
  if ! kill -0 "$pid" 2>/dev/null; then
    tail -n 20 "$logfile" >&2 || true
    die "$name exited at start (log above)"
  fi
}

# The pids of the processes whose parent is $1 (nginx's workers).
children_of() {
  local stat_file stat pid
  local -a fields
  for stat_file in /proc/[0-9]*/stat; do
    { stat=$(<"$stat_file"); } 2>/dev/null || continue
    stat=${stat##*") "}
    read -ra fields <<<"$stat"
    if [[ ${fields[1]} == "$1" ]]; then
      pid=${stat_file#/proc/}
      echo "${pid%/stat}"
    fi
  done
}

# When started as root, nginx workers run as an unprivileged user and must read the files.
chmod 755 "$tmp"

# ---------------------------------------------------------------------------------------------
# The certificate: self-signed, ECDSA P-256, for bench.example; both proxies and the HTTPS
# ceiling serve it.

"$openssl_bin" req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$tmp/key.pem" -out "$tmp/cert.pem" -days 2 -subj "/CN=$host" \
  -addext "subjectAltName=DNS:$host" >"$tmp/openssl.log" 2>&1 ||
  die "openssl req failed: $(tail -n 5 "$tmp/openssl.log")"

# Settings the two nginx instances share (inside `http {}`); $1 names the instance.
nginx_common() {
  cat <<EOF
    access_log off;
    client_body_temp_path $tmp/$1-tmp/body;
    proxy_temp_path $tmp/$1-tmp/proxy;
    fastcgi_temp_path $tmp/$1-tmp/fastcgi;
    uwsgi_temp_path $tmp/$1-tmp/uwsgi;
    scgi_temp_path $tmp/$1-tmp/scgi;
    default_type application/octet-stream;
    tcp_nodelay on;
    # Keep-alive connections stay open for the whole run (the default closes them after 1000
    # requests, which would add connection set-ups to the keep-alive tests).
    keepalive_requests 10000000;
EOF
}

# Starts nginx with $tmp/$1.conf; sets REPLY to its pid.
start_nginx() {
  local name=$1
  mkdir -p "$tmp/$name-tmp"
  "$nginx_bin" -t -q -e "$tmp/$name-error.log" -p "$tmp" -c "$tmp/$name.conf" ||
    die "nginx rejects $tmp/$name.conf: $(tail -n 5 "$tmp/$name-error.log")"
  "$nginx_bin" -e "$tmp/$name-error.log" -p "$tmp" -c "$tmp/$name.conf" >"$tmp/$name.out" 2>&1 &
  REPLY=$!
  pids+=("$REPLY")
  check_alive "$REPLY" "nginx ($name)" "$tmp/$name-error.log"
}

# ---------------------------------------------------------------------------------------------
# Targets: nginx

target_listens=""
for b in "${backends[@]}"; do
  target_listens+="        listen $b:$backend_port backlog=4096;"$'\n'
done
cat >"$tmp/targets.conf" <<EOF
worker_processes auto;
worker_rlimit_nofile 16384;
daemon off;
pid $tmp/targets.pid;
error_log $tmp/targets-error.log warn;
events {
    worker_connections 4096;
}
http {
$(nginx_common targets)
    keepalive_timeout 75s;
    server {
$target_listens        listen ${backends[0]}:$backend_tls_port ssl backlog=4096;
        ssl_certificate $tmp/cert.pem;
        ssl_certificate_key $tmp/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        location = / { return 200 "ok\n"; }
        location = /who { return 200 "\$server_addr\n"; }
        location = /echo {
            return 200 "host=\$http_host xff=\$http_x_forwarded_for proto=\$http_x_forwarded_proto xfh=\$http_x_forwarded_host connection=\$http_connection\n";
        }
    }
}
EOF
start_nginx targets
targets_pid=$REPLY

# ---------------------------------------------------------------------------------------------
# nginx as the reverse proxy

upstream_servers=""
for b in "${backends[@]}"; do
  upstream_servers+="        server $b:$backend_port;"$'\n'
done
cat >"$tmp/proxy.conf" <<EOF
worker_processes $proxy_threads;
worker_rlimit_nofile 16384;
daemon off;
pid $tmp/proxy.pid;
error_log $tmp/proxy-error.log warn;
events {
    worker_connections 4096;
}
http {
$(nginx_common proxy)
    keepalive_timeout 60s;
    upstream web {
$upstream_servers        keepalive 64;
        keepalive_requests 10000000;
    }
    server {
        listen $nginx_proxy_addr:$http_port default_server backlog=4096;
        listen $nginx_proxy_addr:$https_port ssl default_server backlog=4096;
        server_name $host;
        ssl_certificate $tmp/cert.pem;
        ssl_certificate_key $tmp/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {
            proxy_pass http://web;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$http_host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Forwarded-Host \$http_host;
            proxy_connect_timeout 5s;
            proxy_send_timeout 60s;
            proxy_read_timeout 60s;
        }
    }
}
EOF
start_nginx proxy
nginx_proxy_pid=$REPLY

# ---------------------------------------------------------------------------------------------
# Portico: the local cloud and one application load balancer

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

targets_json=$(
  i=1
  for b in "${backends[@]}"; do
    printf '{"node":"nginx%d","address":"%s","port":%d}\n' "$i" "$b" "$backend_port"
    i=$((i + 1))
  done | jq -s -c .
)
spec=$(
  jq -n --arg name "$lb_name" --arg host "$host" --argjson targets "$targets_json" \
    --argjson http_port "$http_port" --argjson https_port "$https_port" \
    --argjson probe_port "$backend_port" \
    --rawfile chain "$tmp/cert.pem" --rawfile key "$tmp/key.pem" '{
      name: $name,
      owner: {clusterId: "bench-l7", objectUid: "bench-l7", objectRef: "Ingress/bench/l7"},
      frontend: {
        type: "application",
        httpPort: $http_port,
        https: {
          port: $https_port,
          certificates: [{name: "bench", hosts: [$host], source: {type: "pem", chain: $chain, key: $key}}]
        },
        routes: {hosts: [{
          host: {type: "exact", value: $host},
          paths: [{path: {type: "prefix", value: "/"}, backend: "web"}]
        }]},
        backends: [{name: "web", pool: {
          targets: $targets,
          healthCheck: {
            probe: {type: "tcp", port: $probe_port},
            interval: 2000, timeout: 2000, healthyThreshold: 1, unhealthyThreshold: 2
          },
          affinity: {type: "none"}
        }}]
      }
    }'
)
status=$(curl -fsS -X PUT -H 'Content-Type: application/json' --data-binary "$spec" \
  "http://$api/v1/loadbalancers/$lb_name") || die "creating the load balancer failed"
portico_addr=$(jq -r '.addresses[0].ip // empty' <<<"$status" 2>/dev/null || true)
[[ -n $portico_addr ]] || die "no address in the load balancer's status: $status"
if [[ $(jq '[.ports[]? | select(.error != null)] | length' <<<"$status") -ne 0 ]]; then
  die "the load balancer does not serve all its ports: $status"
fi
log "Portico load balancer at $portico_addr:$http_port/$https_port, nginx at $nginx_proxy_addr:$http_port/$https_port"

# All 3 targets healthy, so round robin covers all of them from the first measured request.
for ((i = 0; ; i++)); do
  healthy=$(curl -fsS "http://$api/metrics" | grep -c 'state="healthy"} 1$' || true)
  [[ $healthy -lt ${#backends[@]} ]] || break
  [[ $i -lt 100 ]] || die "Portico's targets not healthy after 10 s ($healthy healthy)"
  sleep 0.1
done

# ---------------------------------------------------------------------------------------------
# Both proxies do the same job: every request goes to the next of the 3 targets, with the
# same forwarding headers.

# curl SCHEME ADDR PORT PATH: a request for bench.example (Host and SNI) sent to ADDR.
fetch() {
  local scheme=$1 addr=$2 port=$3 path=$4
  curl -fsS -k --resolve "$host:$port:$addr" "$scheme://$host:$port$path"
}
distribution() {
  local n
  for ((n = 0; n < 3 * ${#backends[@]}; n++)); do
    fetch "$@" /who
  done | sort | uniq -c | awk '{printf "%s%s×%s", sep, $2, $1; sep=", "}'
}
for scheme in http https; do
  port=$http_port
  [[ $scheme == http ]] || port=$https_port
  portico_spread=$(distribution "$scheme" "$portico_addr" "$port")
  nginx_spread=$(distribution "$scheme" "$nginx_proxy_addr" "$port")
  # Portico's round robin is one counter per backend; each nginx worker keeps its own (no
  # `zone`), so nginx is exactly 3/3/3 only per worker, but 9 requests reach every target.
  if [[ $(tr ',' '\n' <<<"$portico_spread" | grep -c '×3$') -ne ${#backends[@]} ]]; then
    die "round robin check failed ($scheme): 9 requests through Portico went to $portico_spread"
  fi
  if [[ $(tr ',' '\n' <<<"$nginx_spread" | grep -c '×') -ne ${#backends[@]} ]]; then
    die "round robin check failed ($scheme): 9 requests through nginx went to $nginx_spread"
  fi
  portico_echo=$(fetch "$scheme" "$portico_addr" "$port" /echo)
  nginx_echo=$(fetch "$scheme" "$nginx_proxy_addr" "$port" /echo)
  if [[ $portico_echo != "$nginx_echo" ]]; then
    die "the proxies forward different headers ($scheme): Portico '$portico_echo', nginx '$nginx_echo'"
  fi
  log "$scheme: round robin over 9 requests: Portico $portico_spread; nginx $nginx_spread"
  log "$scheme: the targets see, from both: $portico_echo"
done
echo_http=$(fetch http "$portico_addr" "$http_port" /echo)
echo_https=$(fetch https "$portico_addr" "$https_port" /echo)

# What a TLS handshake negotiates with each server (wrk uses the same OpenSSL and defaults),
# and whether the server resumes the session on the next connection, as wrk's reconnections
# would try to (TLS 1.3 tickets arrive after the handshake: the first connection sends a
# request and reads the answer before it saves its session).
tls_summary() {
  local addr=$1 port=$2 out proto group resumed
  out=$(printf 'GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$host" |
    timeout 10 "$openssl_bin" s_client -connect "$addr:$port" -servername "$host" -ign_eof \
      -sess_out "$tmp/tls-session" 2>/dev/null || true)
  proto=$(sed -n 's/^New, \(TLSv[0-9.]*\), Cipher is \(.*\)$/\1 \2/p' <<<"$out" | head -n 1)
  group=$(sed -n 's/^Server Temp Key: \([^,]*\).*/\1/p' <<<"$out" | head -n 1)
  resumed="does not resume sessions"
  if [[ -s $tmp/tls-session ]] &&
    timeout 10 "$openssl_bin" s_client -connect "$addr:$port" -servername "$host" \
      -sess_in "$tmp/tls-session" </dev/null 2>/dev/null | grep -q '^Reused, '; then
    resumed="resumes sessions"
  fi
  rm -f "$tmp/tls-session"
  echo "${proto:-?}, ${group:-?}, $resumed"
}
tls_portico=$(tls_summary "$portico_addr" "$https_port")
tls_nginx=$(tls_summary "$nginx_proxy_addr" "$https_port")
tls_direct=$(tls_summary "${backends[0]}" "$backend_tls_port")
log "TLS: Portico $tls_portico; nginx $tls_nginx; direct $tls_direct"

# ---------------------------------------------------------------------------------------------
# Measuring

# wrk looks up the URL's host (bench.example) before anything else; this replaces the lookup
# with the address under test (BENCH_CONNECT), keeping Host and SNI. Then one
# machine-readable line per run: totals, latency percentiles (us), errors.
cat >"$tmp/bench.lua" <<'EOF'
local connect = os.getenv("BENCH_CONNECT")
wrk.resolve = function(host, service)
  wrk.addrs = wrk.lookup(connect, service)
end
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

# utime + stime of processes (all their threads), in clock ticks.
cpu_ticks() {
  local pid stat sum=0
  local -a f
  for pid in "$@"; do
    stat=$(<"/proc/$pid/stat")
    stat=${stat##*") "}
    read -ra f <<<"$stat"
    sum=$((sum + f[11] + f[12]))
  done
  echo "$sum"
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

# The 1-minute load average.
load1() { cut -d' ' -f1 /proc/loadavg; }

# Busy and total clock ticks of the whole machine, into REPLY. Busy counts interrupt time too,
# as the kernel charges it to the process it interrupted (mostly network work for a server).
machine_ticks() {
  local -a c
  read -ra c < <(head -n 1 /proc/stat)
  REPLY="$((c[1] + c[2] + c[3] + c[6] + c[7])) $((c[1] + c[2] + c[3] + c[4] + c[5] + c[6] + c[7] + c[8]))"
}

# Clock ticks used by the servers (both nginx instances and their workers, Portico), into
# REPLY.
servers_ticks() {
  REPLY=$(cpu_ticks "${server_pids[@]}")
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

# measure TEST TARGET URL ADDR CONNS [wrk args...]: a warm-up run, then the measured run,
# both connecting to ADDR. Sets `result` (wrk's RESULT line), `proxy_ticks` (-1 without a
# proxy) and `foreign` (% of the machine's CPU time that went to processes other than wrk
# and the servers).
measure() {
  local target=$2 url=$3 addr=$4 conns=$5
  shift 5
  local -a proc=()
  case $target in
    portico) proc=("$portico_pid") ;;
    nginx) proc=("${nginx_proxy_pids[@]}") ;;
  esac
  local -a wrk_args=(-t1 -c"$conns" -s "$tmp/bench.lua" -H "Host: $host" "$@" "$url")
  BENCH_CONNECT=$addr "${wrk_cmd[@]}" -d"${warmup}s" "${wrk_args[@]}" >/dev/null
  local before=0 after=0 out m0 m1 s0 s1 c0 c1
  [[ ${#proc[@]} -eq 0 ]] || before=$(cpu_ticks "${proc[@]}")
  machine_ticks && m0=$REPLY
  servers_ticks && s0=$REPLY
  children_ticks && c0=$REPLY
  out=$(BENCH_CONNECT=$addr "${wrk_cmd[@]}" -d"${duration}s" --latency "${wrk_args[@]}")
  machine_ticks && m1=$REPLY
  servers_ticks && s1=$REPLY
  children_ticks && c1=$REPLY
  [[ ${#proc[@]} -eq 0 ]] || after=$(cpu_ticks "${proc[@]}")
  result=$(grep '^RESULT ' <<<"$out") || die "no result from wrk: $out"
  proxy_ticks=$((${#proc[@]} ? after - before : -1))
  local busy0=${m0% *} total0=${m0#* } busy1=${m1% *} total1=${m1#* }
  local others=$((busy1 - busy0 - (s1 - s0) - (c1 - c0)))
  foreign=$((others > 0 && total1 > total0 ? 100 * others / (total1 - total0) : 0))
}

# run_wrk TEST TARGET URL ADDR CONNS [wrk args...]: measures, again (up to twice, and 6 times
# per benchmark) while other processes took more than max_foreign % of the CPU; appends one
# line to $tmp/runs.tsv.
run_wrk() {
  local test=$1 target=$2 attempt
  for ((attempt = 1; ; attempt++)); do
    measure "$@"
    if [[ $foreign -le $max_foreign ]] || [[ $attempt -ge 3 ]] || [[ $repeats -ge 6 ]]; then
      break
    fi
    repeats=$((repeats + 1))
    log "round $round $test $target: other processes took ${foreign}% of the CPU; measuring again"
    wait_for_quiet 20 >/dev/null
  done
  local requests duration_us bytes p50 p99 errors non2xx
  read -r requests duration_us bytes p50 p99 errors non2xx < <(
    sed -e 's/^RESULT //' -e 's/[a-z0-9_]*=//g' <<<"$result"
  )
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$test" "$target" \
    "$requests" "$duration_us" "$bytes" "$p50" "$p99" "$errors" "$non2xx" "$proxy_ticks" \
    "$foreign" >>"$tmp/runs.tsv"
  log "round $round $test $target: $requests requests, p99 ${p99} us, errors $errors/$non2xx, others ${foreign}% CPU"
}

# addr_of TARGET SCHEME / url_of TARGET SCHEME: where wrk connects, and the URL it asks for.
addr_of() {
  case $1 in
    direct) echo "${backends[0]}" ;;
    portico) echo "$portico_addr" ;;
    nginx) echo "$nginx_proxy_addr" ;;
  esac
}
url_of() {
  local port
  case $1:$2 in
    direct:http) port=$backend_port ;;
    direct:https) port=$backend_tls_port ;;
    *:http) port=$http_port ;;
    *:https) port=$https_port ;;
  esac
  echo "$2://$host:$port/"
}

: >"$tmp/runs.tsv"
mapfile -t nginx_proxy_workers < <(children_of "$nginx_proxy_pid")
mapfile -t targets_workers < <(children_of "$targets_pid")
[[ ${#nginx_proxy_workers[@]} -eq $proxy_threads ]] ||
  die "the nginx proxy runs ${#nginx_proxy_workers[@]} workers, not $proxy_threads"
nginx_proxy_pids=("$nginx_proxy_pid" "${nginx_proxy_workers[@]}")
server_pids=("$targets_pid" "${targets_workers[@]}" "${nginx_proxy_pids[@]}" "$portico_pid")
max_foreign=${BENCH_MAX_FOREIGN:-15}
repeats=0
quiet_log=""

# The load average trails the last minute: wait for earlier work (a build, someone else's)
# to die down before the first round.
load_before=$(load1)
if [[ $load_wait -gt 0 ]] && awk -v l="$load_before" -v m="$max_load" 'BEGIN { exit !(l >= m) }'; then
  log "1-minute load average $load_before; waiting up to $load_wait s for it to drop below $max_load"
  for ((i = 0; i < load_wait / 5; i++)); do
    sleep 5
    awk -v l="$(load1)" -v m="$max_load" 'BEGIN { exit !(l >= m) }' || break
  done
fi
load_start=$(load1)
if awk -v l="$load_start" -v m="$max_load" 'BEGIN { exit !(l >= m) }'; then
  log "1-minute load average still $load_start; measuring anyway (see the table's notes)"
fi

started=$(date +%s)
for ((round = 1; round <= rounds; round++)); do
  busy=$(wait_for_quiet 60)
  quiet_log+="${quiet_log:+, }round $round: ${busy}%"
  if ((round % 2)); then
    order=(direct portico nginx)
  else
    order=(direct nginx portico)
  fi
  for test in $tests; do
    for target in "${order[@]}"; do
      case $test in
        http | https)
          run_wrk "$test" "$target" "$(url_of "$target" "$test")" "$(addr_of "$target")" "$ka_conns"
          ;;
        handshake)
          run_wrk handshake "$target" "$(url_of "$target" https)" "$(addr_of "$target")" "$hs_conns" \
            -H 'Connection: close'
          ;;
      esac
    done
  done
done
elapsed=$(($(date +%s) - started))
load_end=$(load1)

# ---------------------------------------------------------------------------------------------
# Report

git_rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git status --porcelain -- providers 2>/dev/null) ]]; then
  git_rev+=" + uncommitted changes in providers/"
fi
cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
nginx_version=$("$nginx_bin" -v 2>&1 | head -n 1)
wrk_version=$("$wrk_bin" -v 2>&1 | head -n 1 | cut -d' ' -f1-2 || true)
openssl_version=$("$openssl_bin" version | cut -d' ' -f1-2)
wrk_pinning="not pinned"
if [[ -n $wrk_cpu ]]; then
  wrk_pinning="pinned to CPU $wrk_cpu"
fi

{
  echo "# L7 proxy benchmark: Portico vs nginx"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- machine: $ncpu CPUs (${cpu_model:-unknown}), kernel $(uname -r)"
  echo "- Portico: \`$("$portico_bin" --version)\` at $git_rev; $proxy_threads proxy workers (single-threaded runtimes); HTTP :$http_port, HTTPS :$https_port (rustls, aws-lc-rs)"
  echo "- nginx (proxy): \`$nginx_version\`, \`worker_processes $proxy_threads\`, upstream keepalive 64, HTTP/1.1 to the targets, same forwarding headers, ssl_protocols TLSv1.2 TLSv1.3, no http2, access_log off (full config in scripts/bench-l7.sh)"
  echo "- targets: the same nginx, 3 addresses, \`worker_processes auto\`, \`/\` answers \"ok\\n\"; the HTTPS ceiling is the first target terminating TLS itself"
  echo "- certificate: self-signed ECDSA P-256 for $host; Host and SNI are $host for every run"
  echo "- TLS as negotiated by $openssl_version (wrk's library): Portico $tls_portico; nginx $tls_nginx; ceiling $tls_direct"
  echo "- both proxies checked before measuring: round robin over all 3 targets, and the targets see the same headers (\`$echo_http\` / \`$echo_https\`)"
  echo "- client: \`$wrk_version\`, 1 thread, $wrk_pinning, \`-H 'Host: $host'\`"
  echo "- rounds: $rounds, each run ${duration} s after a ${warmup} s warm-up of the same test; proxy order alternating; median of the rounds; ${elapsed} s in all"
  echo "- 1-minute load average: $load_before when ready to measure, $load_start at the first round (threshold $max_load), $load_end at the end (which counts the benchmark's own processes)"
  echo "- CPU used by other processes: before each round (idle servers) $quiet_log; during the measured runs at most $(cut -f12 "$tmp/runs.tsv" | sort -n | tail -n 1)% (column \"others\" below); runs measured again because others took more than ${max_foreign}%: $repeats"
  echo
  awk -F'\t' -v clk="$clk_tck" -v ka="$ka_conns" -v hs="$hs_conns" '
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
      if (kind == "pct") return sprintf("%.0f %%", v)
      if (kind == "us") return sprintf("%.1f µs", v)
      return v
    }
    # Portico relative to nginx; "better" follows the direction of the metric; within 3 % is noise.
    function versus(p, h, higher_better,    d, word) {
      if (h == 0) return "—"
      d = 100 * (p - h) / h
      if (d > -3 && d < 3) word = "≈ same"
      else if ((d > 0) == higher_better) word = "Portico better"
      else word = "Portico worse"
      return sprintf("%+.0f %% (%s)", d, word)
    }
    function row(test, metric, label, kind, higher_better,    d, p, h) {
      d = median(test "|direct|" metric)
      p = median(test "|portico|" metric)
      h = median(test "|nginx|" metric)
      printf "| %s | %s | %s | %s | %s |\n", label,
        (count[test "|direct|" metric] ? fmt(kind, d) : "—"), fmt(kind, p), fmt(kind, h),
        versus(p, h, higher_better)
    }
    function section(test, what) {
      row(test, "rate", what "s/s", "rate", 1)
      row(test, "p50", "latency p50", "lat", 0)
      row(test, "p99", "latency p99", "lat", 0)
      row(test, "cpu", "proxy CPU (% of one core)", "pct", 0)
      row(test, "cpu_per_req", "proxy CPU per " what, "us", 0)
      row(test, "errors", "errors", "rate", 0)
    }
    {
      round = $1; test = $2; target = $3; requests = $4; secs = $5 / 1e6
      k = test "|" target "|"
      add(k "rate", requests / secs)
      add(k "p50", $7)
      add(k "p99", $8)
      add(k "errors", $9 + $10)
      if ($11 >= 0) {
        cpu = $11 / clk
        add(k "cpu", 100 * cpu / secs)
        add(k "cpu_per_req", 1e6 * cpu / requests)
      }
      raw[++nraw] = sprintf("| %s | %s | %s | %.0f | %s | %s | %s | %s | %s %% |", round,
        test, target, requests / secs, lat($7), lat($8),
        ($11 >= 0 ? sprintf("%.0f %%", 100 * $11 / clk / secs) : "—"), $9 + $10, $12)
    }
    END {
      print "| metric | direct to 1 target (ceiling) | Portico | nginx | Portico vs nginx |"
      print "|---|---|---|---|---|"
      if (count["http|portico|rate"]) {
        printf "| **HTTP keep-alive** (`-c %d`, `http://bench.example/`) | | | | |\n", ka
        section("http", "request")
      }
      if (count["https|portico|rate"]) {
        printf "| **HTTPS keep-alive** (`-c %d`, `https://bench.example/`) | | | | |\n", ka
        section("https", "request")
      }
      if (count["handshake|portico|rate"]) {
        printf "| **TLS connection rate** (`-c %d`, `Connection: close`, `https://bench.example/`) | | | | |\n", hs
        section("handshake", "connection")
      }
      print ""
      print "Errors are wrk socket errors (connect, read, write, timeout) plus non-2xx answers."
      print "\"≈ same\": Portico within ±3 % of nginx. Latency and CPU: lower is better. The runs below show the spread between rounds;"
      print "\"others\" is the share of all CPU time that went to processes other than wrk, the nginx instances and Portico during the run."
      print "In the TLS connection-rate test every request is a new TCP connection and TLS handshake; wrk offers the session of its"
      print "previous connection, so a handshake is a resumption where the server allows it (see the TLS line above)."
      print ""
      print "<details><summary>Every measured run</summary>"
      print ""
      print "| round | test | target | req/s | p50 | p99 | proxy CPU | errors | others |"
      print "|---|---|---|---|---|---|---|---|---|"
      for (i = 1; i <= nraw; i++) print raw[i]
      print ""
      print "</details>"
    }
  ' "$tmp/runs.tsv"
} >"$tmp/l7.md"

mkdir -p bench-results
cp "$tmp/l7.md" bench-results/l7.md
cat bench-results/l7.md
log "written to bench-results/l7.md"
