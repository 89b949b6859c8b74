"""The top floor: the drivers that put the floors below to work on a cluster -- ``run``
(:mod:`.pipeline`), ``ingest`` (:mod:`.ingest`) and the yearly ``workflow`` -- on one
driver skeleton (:mod:`.driver`)."""
