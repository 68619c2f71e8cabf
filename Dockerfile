FROM python:3.11-slim

# bash is the product; procps gives operators `ps` inside the pod.
RUN apt-get update \
    && apt-get install -y --no-install-recommends bash procps \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/execd
COPY pyproject.toml README.md ./
COPY execd ./execd
RUN pip install --no-cache-dir . && mkdir -p /workspace

ENV EXECD_HOST=0.0.0.0 EXECD_PORT=44772 EXECD_LOG_FORMAT=json
EXPOSE 44772
WORKDIR /workspace
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD python -c "import os,sys,urllib.request; port=os.environ.get('EXECD_PORT') or '44772'; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2).status == 200 else 1)"
# execd reaps orphans itself (it is a child subreaper, and fine as PID 1).
ENTRYPOINT ["execd", "serve"]
