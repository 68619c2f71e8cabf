# Two stages: the bundle is built on a Python image, and the image that ships has no Python.

# 1. The bundle: `scripts/bundle` builds a PyInstaller one-dir bundle (the daemon with its own
# Python). It runs wherever glibc is at least the builder's (2.36, bookworm's) and bash is there.
FROM python:3.11-slim-bookworm AS bundle
# PyInstaller needs binutils (objdump, objcopy, readelf) on Linux; the image's Python has the
# shared libpython that PyInstaller bundles.
RUN apt-get update \
    && apt-get install -y --no-install-recommends binutils \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY execd ./execd
COPY packaging ./packaging
COPY scripts ./scripts
# Exactly one directory, /out/execd-<version>-linux-<arch>, becomes /opt/execd.
RUN bash scripts/bundle --out /out \
    && set -- /out/execd-*-linux-*/ \
    && [ "$#" -eq 1 ] && [ -x "$1/execd" ] \
    && mv "$1" /opt/execd

# 2. The image: Debian, bash and the bundle. In a Kubernetes pod it is also the source an init
# container copies the bundle from (deploy/kubernetes/injection.yaml), or a sidecar of its own
# (deploy/kubernetes/sidecar.yaml).
FROM debian:bookworm-slim
# bash is the product; procps gives operators `ps` inside the pod.
RUN apt-get update \
    && apt-get install -y --no-install-recommends bash procps \
    && rm -rf /var/lib/apt/lists/*
COPY --from=bundle /opt/execd /opt/execd
# The daemon stays root (to switch users, kill any tree, manage cgroups); every shell runs as
# the unprivileged `sandbox` user (setpriv, from util-linux, does the switch at spawn).
RUN useradd --create-home --home-dir /home/sandbox --uid 1000 --user-group --shell /bin/bash sandbox \
    && mkdir -p /workspace && chown sandbox:sandbox /workspace

ENV EXECD_HOST=0.0.0.0 EXECD_PORT=44772 EXECD_LOG_FORMAT=json EXECD_RUN_AS=sandbox
EXPOSE 44772
WORKDIR /workspace
# No Python here: bash's /dev/tcp asks GET /healthz and looks for a 200 status line.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${EXECD_PORT:-44772} && printf 'GET /healthz HTTP/1.0\\r\\nHost: 127.0.0.1\\r\\n\\r\\n' >&3 && IFS= read -r -t 2 line <&3 && [[ $line == *' 200 '* ]]"]
# execd reaps orphans itself (it is a child subreaper, and fine as PID 1).
ENTRYPOINT ["/opt/execd/execd", "serve"]
