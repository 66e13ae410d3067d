#!/bin/sh
# API container: wait until Triton is ready, then serve pygeoapi (behind kappamask's
# request guard: /health, /health/ready, body limits) under gunicorn; each gunicorn worker
# fills in pygeoapi's configuration from the settings (KAPPAMASK_*) and writes its OpenAPI
# document (self-contained: the OGC schemas it refers to are inside). gthread workers: the
# Triton HTTP client and gevent workers do not mix.
set -eu
python -m kappamask.cli wait-triton  # KAPPAMASK_TRITON_URL, _PROTOCOL, _WAIT_S
exec gunicorn kappamask.api.wsgi:app \
  --bind "0.0.0.0:$KAPPAMASK_PORT" \
  --worker-class gthread --workers "${GUNICORN_WORKERS:-2}" --threads "${GUNICORN_THREADS:-4}" \
  --timeout 0 --graceful-timeout 60 --access-logfile -
