# primeintellect-build-exporter as a container image.
#
#   docker build --build-arg VERSION=0.1.0 -t primeintellect-build-exporter:0.1.0 .
#
# The build stage gathers wheels: the dependencies' at the exact versions of the lock file
# requirements/runtime.txt, each file checked against the lock's hashes, and the exporter's.
# The final stage installs only those wheels, without an index, into /opt/venv, checking
# the hashes again, so it never builds anything and carries no compiler, source or pip cache.
# tests/deployment/test_dockerfile.py runs hadolint on this file and replays its RUN lines
# (the wheel build and the install) on the host, so keep them in the same shape.

ARG PYTHON_VERSION=3.12.12

FROM python:${PYTHON_VERSION}-slim-bookworm AS build

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY requirements/runtime.txt requirements/
COPY exporter/ exporter/
# The exporter's wheel comes alone (--no-deps): pip's hash mode cannot hash a source directory.
RUN pip wheel --no-cache-dir --require-hashes --wheel-dir /wheels -r requirements/runtime.txt \
    && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:${PYTHON_VERSION}-slim-bookworm

# The exporter's version; keep the default equal to exporter/__init__.py.
ARG VERSION=0.1.0
ARG REVISION=""
ARG SOURCE_URL=https://github.com/primeintellect-build-exporter/primeintellect-build-exporter

LABEL org.opencontainers.image.title="primeintellect-build-exporter" \
      org.opencontainers.image.description="Prometheus exporter for Prime Intellect image builds" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"

# A fixed numeric user, so Kubernetes can check runAsNonRoot without reading /etc/passwd.
# -l: no lastlog/faillog entries, which for a high UID would make a huge sparse file.
RUN groupadd --system --gid 65532 exporter \
    && useradd --system -l --uid 65532 --gid 65532 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin exporter

# The venv gets no pip of its own: the base image's pip installs into it (--python).
# pip compiles every module to bytecode here, so nothing is written at run time.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    --mount=type=bind,from=build,source=/src/requirements,target=/src/requirements \
    python -m venv --without-pip /opt/venv \
    && python -m pip --python /opt/venv/bin/python install --no-cache-dir --no-index \
        --find-links=/wheels --require-hashes -r /src/requirements/runtime.txt \
    && python -m pip --python /opt/venv/bin/python install --no-cache-dir --no-index \
        --no-deps /wheels/primeintellect_build_exporter-*.whl

# Works with a read-only root filesystem: no bytecode written, logs go straight out,
# and nothing else is written anywhere (mount an emptyDir at /tmp if a platform wants one).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

USER 65532:65532
EXPOSE 9862

# For `docker run` and Compose (Kubernetes ignores it; the chart has probes): a GET of
# /-/healthy, which answers 503 once the poller stops making progress. It sends no
# credentials and speaks plain http, so with basic auth on (401) or TLS on (https only) it
# fails: override it at run time (`docker run --health-cmd ...`, or Compose
# `healthcheck.test` as the Compose example of docs/deployment.md shows) or drop it
# (`--no-healthcheck`). With another listen port, change the URL. No proxy (one set for the
# API must not catch loopback), and a timeout below --timeout, so the health log says what
# failed.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u\ntry:\n    u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:9862/-/healthy', timeout=4)\nexcept Exception as error:\n    sys.exit(f'unhealthy: {error}')"]

# Exec form: the exporter is PID 1 and handles SIGTERM itself (exit 0 within seconds).
# Kubernetes probes /-/healthy and /-/ready; elsewhere, see "Docker" in docs/deployment.md.
ENTRYPOINT ["/opt/venv/bin/primeintellect-build-exporter"]
CMD ["--config.file=/etc/primeintellect-build-exporter/config.yaml"]
