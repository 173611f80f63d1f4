# The pgpilot proxy: `docker run -p 6432:6432 -p 9930:9930 -e PGPILOT_UPSTREAM=postgresql://u:p@db:5432/app pgpilot`
# (or mount a config file over /etc/pgpilot/config.yaml). `docker run pgpilot learn ...` runs the learner.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY pyproject.toml README.md /src/
COPY pgpilot /src/pgpilot
COPY proxy /src/proxy
COPY learning /src/learning
COPY advisors /src/advisors
RUN pip install /src && rm -rf /src

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/pgpilot --create-home pgpilot
COPY docker/config.yaml /etc/pgpilot/config.yaml
USER pgpilot
WORKDIR /var/lib/pgpilot

# 6432: PostgreSQL clients and the admin console (database pgpilot); 9930: /metrics, /healthz, /readyz.
EXPOSE 6432 9930
# slim has no curl: python's urllib asks /healthz.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9930/healthz', timeout=2)"]
# SIGTERM: open transactions finish (up to timeouts.shutdown), then exit 0; give `docker stop -t` that long.
STOPSIGNAL SIGTERM
ENTRYPOINT ["pgpilot"]
CMD ["serve", "-c", "/etc/pgpilot/config.yaml"]
