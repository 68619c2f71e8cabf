FROM python:3.11-slim

# bash is the product; procps gives operators `ps` inside the pod.
RUN apt-get update \
    && apt-get install -y --no-install-recommends bash procps \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/execd
COPY pyproject.toml README.md ./
COPY execd ./execd
# The daemon stays root (to switch users, kill any tree, manage cgroups); every shell runs as
# the unprivileged `sandbox` user (setpriv, from util-linux, does the switch at spawn).
RUN pip install --no-cache-dir . \
    && useradd --create-home --home-dir /home/sandbox --uid 1000 --user-group --shell /bin/bash sandbox \
    && mkdir -p /workspace && chown sandbox:sandbox /workspace

ENV EXECD_HOST=0.0.0.0 EXECD_PORT=44772 EXECD_LOG_FORMAT=json EXECD_RUN_AS=sandbox
EXPOSE 44772
WORKDIR /workspace
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD python -c "import os,sys,urllib.request; port=os.environ.get('EXECD_PORT') or '44772'; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2).status == 200 else 1)"
# execd reaps orphans itself (it is a child subreaper, and fine as PID 1).
ENTRYPOINT ["execd", "serve"]
