"""Jobs: what a running job reports (``reporting``) and why one failed (``failures``),
pygeoapi job managers (``managers``), the Celery queue and its workers (``queue``,
``worker``), batches (``batch``) and their fan-out into child jobs (``fanout``), and OGC
callbacks (``callbacks``)."""
