"""Where the pixels are: the output grid (``grid``), the area of interest (``aoi``) and the
512 px crops over the grid with the blend of their overlaps (``tiling``)."""
