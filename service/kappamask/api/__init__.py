"""The HTTP API: the pygeoapi processes (``process``), what the service answers before and
around pygeoapi (``guard``, ``ogc``), its own web page (``site``) and its launchers
(``serve`` for one machine, ``wsgi`` for gunicorn)."""
