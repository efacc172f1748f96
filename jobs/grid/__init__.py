"""The grid job: the whole collection on one zoomable map (layout, quality, deep-zoom tiles)."""
