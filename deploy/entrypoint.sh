#!/bin/sh
# API container: wait until Triton is ready, write the OpenAPI document from the config
# (environment substituted; self-contained: the OGC schemas it refers to are inside), then serve pygeoapi (behind kappamask's request guard:
# /health, /health/ready, body limits) under gunicorn. gthread workers: the
# Triton HTTP client and gevent workers do not mix.
set -eu
python -m kappamask.cli wait-triton "${KAPPAMASK_TRITON_URL:-triton:8000}" \
  --protocol "${KAPPAMASK_TRITON_PROTOCOL:-http}" --timeout "${KAPPAMASK_TRITON_WAIT_S:-900}"
python -m kappamask.cli openapi "$PYGEOAPI_CONFIG" --output-file "$PYGEOAPI_OPENAPI"
exec gunicorn kappamask.api.wsgi:app \
  --bind "0.0.0.0:${KAPPAMASK_PORT:-5000}" \
  --worker-class gthread --workers "${GUNICORN_WORKERS:-2}" --threads "${GUNICORN_THREADS:-4}" \
  --timeout 0 --graceful-timeout 60 --access-logfile -
