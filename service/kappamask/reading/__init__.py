"""Reading a product's bands onto the output grid: windowed, resampled and normalised reads
(``reader``, ``regrid``, ``compiled``), under one GDAL environment (``gdal``) whose every
connection the access policy checks (``egress``)."""
