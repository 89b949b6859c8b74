"""The output products: schema and per-block computation, the archive opener, COG export, STAC."""
