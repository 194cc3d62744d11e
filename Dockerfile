# Herald: realtime WebSocket pub/sub server.
#
#   docker build -t herald .
#   docker run --rm -p 8000:8000 herald
#
# Configure with HERALD_* variables (docs/operations.md); change the port with
# HERALD_PORT, which the health check reads too.

# Build stage: install Herald and its dependencies into a virtualenv. Every
# dependency ships binary wheels, so no compiler is needed.
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/herald
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY server ./server
RUN /opt/herald/bin/pip install --no-cache-dir -c constraints.txt .

# Runtime stage: the slim base plus the virtualenv; no sources, no build cache.
FROM python:3.11-slim
ENV PATH=/opt/herald/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=build /opt/herald /opt/herald
RUN groupadd --system --gid 10001 herald \
    && useradd --system --uid 10001 --gid herald --no-create-home --shell /usr/sbin/nologin herald
USER 10001:10001
EXPOSE 8000
# Liveness: /healthz answers 200 while the event loop runs (urlopen raises otherwise).
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('HERALD_PORT', '8000') + '/healthz', timeout=4)"]
# SIGTERM closes every WebSocket with 1012, lets HTTP requests finish, exits 0.
STOPSIGNAL SIGTERM
CMD ["herald", "serve", "--host", "0.0.0.0"]
