# qsmdask runtime image: the `qsmdask` CLI, the Dask scheduler/worker (`dask ...`) and the
# Prefect Kubernetes worker (`prefect worker start --type kubernetes`) from one image.
#
# Build (BuildKit; the local CA is passed as a secret so it never lands in a layer):
#   DOCKER_BUILDKIT=1 docker build --network=host \
#     --secret id=hostca,src=/etc/ssl/certs/ca-certificates.crt \
#     --build-arg BASE_IMAGE=python:3.11-slim -t qsmdask:dev .
# BASE_IMAGE may be any Debian bookworm image (python:3.11-slim, or a debootstrap'ed
# bookworm; see .ci/docker.sh). Python 3.11 is taken from the base when present, otherwise
# from Debian packages.
# No "# syntax=" line on purpose: it would pull a frontend image from a registry.

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- builder
FROM ${BASE_IMAGE} AS builder
ARG EXTRA_PACKAGES="prefect-kubernetes s3fs"
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180

# python:3.11-slim makes a venv as is; a debootstrap'ed bookworm may lack python3 and lacks
# python3-venv (Debian's ensurepip needs it), so install them only when `venv` fails.
RUN if ! python3 -m venv /opt/venv >/dev/null 2>&1; then \
        rm -rf /opt/venv \
        && apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
        && python3 -m venv /opt/venv; \
    fi \
    && /opt/venv/bin/python -m pip --version

# Dependencies first (this layer depends only on constraints.txt): binary wheels only, so
# no compiler is ever needed.
COPY constraints.txt /src/constraints.txt
RUN --mount=type=secret,id=hostca,required=false \
    if [ -s /run/secrets/hostca ]; then export PIP_CERT=/run/secrets/hostca; fi \
    && /opt/venv/bin/pip install --only-binary=:all: -r /src/constraints.txt

# The project itself, resolved against the same pins (no dependency may move). Test suites
# shipped inside wheels are dead weight at runtime (pandas alone ~60 MB). The Prefect
# deployment entrypoint is a path (flows/cohort.py:cohort_flow), so the flow source is
# shipped under /opt/qsmdask as well.
COPY . /src
RUN --mount=type=secret,id=hostca,required=false \
    if [ -s /run/secrets/hostca ]; then export PIP_CERT=/run/secrets/hostca; fi \
    && /opt/venv/bin/pip install -c /src/constraints.txt /src ${EXTRA_PACKAGES} \
    && /opt/venv/bin/pip check \
    && find /opt/venv/lib -type d -path "*/site-packages/*" -name tests -prune -exec rm -rf {} + \
    && /opt/venv/bin/python -c "import qsmdask, flows, dask.array, distributed, prefect, prefect_dask, prefect_kubernetes, zarr, pyarrow, nibabel, scipy, matplotlib, nilearn, ants, statsmodels" \
    && mkdir -p /opt/qsmdask \
    && cp -r /src/flows /opt/qsmdask/flows \
    && find /opt/qsmdask -name __pycache__ -prune -exec rm -rf {} +

# ---------------------------------------------------------------- runtime
FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive

# Runtime interpreter only (no pip, no compilers); a no-op on python:3.11-slim.
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 ca-certificates \
        && apt-get clean \
        && rm -rf /var/lib/apt/lists/* /var/cache/apt/*; \
    fi \
    && groupadd --system --gid 10001 qsmdask \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp \
               --no-create-home --shell /usr/sbin/nologin qsmdask

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/qsmdask /opt/qsmdask

# ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1: seeded ANTs registration is bit-identical from one run to
# the next only with one ITK thread, set before ANTs starts (every process of the image).
# Everything that must be writable lives directly under /tmp (which exists even when a fresh
# tmpfs/emptyDir is mounted there; Prefect does not create missing parents of its home), so
# the root filesystem can be mounted read-only (Kubernetes: readOnlyRootFilesystem + an
# emptyDir on /tmp).
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    MPLCONFIGDIR=/tmp/.matplotlib \
    MPLBACKEND=Agg \
    PREFECT_HOME=/tmp/.prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DASK_TEMPORARY_DIRECTORY=/tmp/dask \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1

LABEL org.opencontainers.image.title="qsmdask" \
      org.opencontainers.image.description="QSM for research cohorts on Dask and Prefect" \
      org.opencontainers.image.licenses="BSD-3-Clause"

USER 10001:10001
WORKDIR /opt/qsmdask
ENTRYPOINT ["qsmdask"]
CMD ["--help"]
