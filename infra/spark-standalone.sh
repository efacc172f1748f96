#!/usr/bin/env bash
# A Spark standalone cluster from pyspark's own distribution: no separate Spark download, the same
# jars as the driver. pip's pyspark ships bin/spark-class but not sbin/start-master.sh, so this
# script starts org.apache.spark.deploy.master.Master / worker.Worker with bin/spark-class itself.
#
#   infra/spark-standalone.sh master [--host H] [--port 7077] [--webui-port 8080]
#   infra/spark-standalone.sh worker spark://H:7077 [--cores N] [--memory 4g] [--instance I] [--host H]
#   infra/spark-standalone.sh local  [--workers 2] [--cores 1] [--memory 1g] [--port 7077]
#                                    # master + workers on this machine, on 127.0.0.1 (tests, a laptop)
#   infra/spark-standalone.sh stop   # every daemon this script started here (pid files)
#   infra/spark-standalone.sh status
#
# On a real cluster: `master` on one node, `worker spark://master:7077` on each worker node (same
# venv path everywhere), then `infra/submit.sh` or `imagelake --master spark://master:7077 run ...`.
# Environment: PYTHON (the venv's python; finds SPARK_HOME), SPARK_HOME, SPARK_PID_DIR (pid files,
# default /tmp/imagelake-spark-$USER), SPARK_LOG_DIR (default $SPARK_PID_DIR/logs), SPARK_WORKER_DIR.
# Web UIs default to a free port (0) in `local` mode so several clusters can share a machine.
set -euo pipefail

PYTHON=${PYTHON:-python3}
SPARK_HOME=${SPARK_HOME:-$("$PYTHON" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')}
export SPARK_HOME
SPARK_PID_DIR=${SPARK_PID_DIR:-/tmp/imagelake-spark-${USER:-$(id -u)}}
SPARK_LOG_DIR=${SPARK_LOG_DIR:-$SPARK_PID_DIR/logs}
SPARK_WORKER_DIR=${SPARK_WORKER_DIR:-$SPARK_PID_DIR/work}
WAIT_S=${WAIT_S:-90}
mkdir -p "$SPARK_PID_DIR" "$SPARK_LOG_DIR" "$SPARK_WORKER_DIR"

die() { echo "spark-standalone: $*" >&2; exit 1; }

start_daemon() {  # name class args...
  local name=$1 class=$2; shift 2
  local pidfile="$SPARK_PID_DIR/$name.pid" log="$SPARK_LOG_DIR/$name.out"
  if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    die "$name is already running (pid $(cat "$pidfile")); stop it first"
  fi
  nohup "$SPARK_HOME/bin/spark-class" "$class" "$@" >>"$log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  echo "started $name (pid $!), log $log"
}

wait_for_log() {  # name pattern
  local log="$SPARK_LOG_DIR/$1.out" pidfile="$SPARK_PID_DIR/$1.pid"
  for _ in $(seq 1 $((WAIT_S * 5))); do
    grep -q "$2" "$log" 2>/dev/null && return 0
    kill -0 "$(cat "$pidfile")" 2>/dev/null || { tail -20 "$log" >&2; die "$1 exited; log $log"; }
    sleep 0.2
  done
  tail -20 "$log" >&2
  die "$1 not ready after ${WAIT_S}s; log $log"
}

cmd_master() {
  local host=${SPARK_MASTER_HOST:-$(hostname -f)} port=7077 webui=8080
  while [[ $# -gt 0 ]]; do
    case $1 in
      --host) host=$2; shift 2 ;; --port) port=$2; shift 2 ;; --webui-port) webui=$2; shift 2 ;;
      *) die "unknown master option $1" ;;
    esac
  done
  # The REST submission server (port 6066) is off unless asked for: it would collide between clusters.
  export SPARK_MASTER_OPTS=${SPARK_MASTER_OPTS:-"-Dspark.master.rest.enabled=false"}
  start_daemon master org.apache.spark.deploy.master.Master --host "$host" --port "$port" --webui-port "$webui"
  [[ ${NO_WAIT:-0} == 1 ]] || wait_for_log master "Starting Spark master at"
  echo "master: spark://$host:$port"
}

cmd_worker() {
  [[ $# -ge 1 ]] || die "worker needs the master URL, e.g. spark://master:7077"
  local url=$1 cores="" memory="" instance=1 host="" webui=8081; shift
  while [[ $# -gt 0 ]]; do
    case $1 in
      --cores) cores=$2; shift 2 ;; --memory) memory=$2; shift 2 ;; --instance) instance=$2; shift 2 ;;
      --host) host=$2; shift 2 ;; --webui-port) webui=$2; shift 2 ;;
      *) die "unknown worker option $1" ;;
    esac
  done
  local args=(--webui-port "$webui" --work-dir "$SPARK_WORKER_DIR/worker-$instance")
  [[ -n $cores ]] && args+=(--cores "$cores")
  [[ -n $memory ]] && args+=(--memory "$memory")
  [[ -n $host ]] && args+=(--host "$host")
  start_daemon "worker-$instance" org.apache.spark.deploy.worker.Worker "${args[@]}" "$url"
}

cmd_local() {
  local workers=2 cores=1 memory=1g port=7077
  while [[ $# -gt 0 ]]; do
    case $1 in
      --workers) workers=$2; shift 2 ;; --cores) cores=$2; shift 2 ;; --memory) memory=$2; shift 2 ;;
      --port) port=$2; shift 2 ;; *) die "unknown local option $1" ;;
    esac
  done
  export SPARK_LOCAL_IP=127.0.0.1
  NO_WAIT=1 cmd_master --host 127.0.0.1 --port "$port" --webui-port 0 >/dev/null
  for i in $(seq 1 "$workers"); do
    cmd_worker "spark://127.0.0.1:$port" --cores "$cores" --memory "$memory" --instance "$i" \
      --host 127.0.0.1 --webui-port 0 >/dev/null
  done
  wait_for_log master "Starting Spark master at"
  for i in $(seq 1 "$workers"); do
    wait_for_log "worker-$i" "Successfully registered with master"
  done
  echo "spark://127.0.0.1:$port"
}

cmd_stop() {
  local pidfile pid
  for pidfile in "$SPARK_PID_DIR"/worker-*.pid "$SPARK_PID_DIR"/master.pid; do
    [[ -f $pidfile ]] || continue
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
      echo "stopped $(basename "$pidfile" .pid) (pid $pid)"
    fi
    rm -f "$pidfile"
  done
}

cmd_status() {
  local pidfile found=1
  for pidfile in "$SPARK_PID_DIR"/master.pid "$SPARK_PID_DIR"/worker-*.pid; do
    [[ -f $pidfile ]] || continue
    found=0
    if kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "$(basename "$pidfile" .pid) running (pid $(cat "$pidfile"))"
    else
      echo "$(basename "$pidfile" .pid) not running (stale pid file)"
    fi
  done
  return $found
}

[[ $# -ge 1 ]] || die "usage: $0 master|worker|local|stop|status [options]"
command=$1; shift
case $command in
  master) cmd_master "$@" ;;
  worker) cmd_worker "$@" ;;
  local) cmd_local "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) die "unknown command $command (master, worker, local, stop, status)" ;;
esac
