"""Inputs: the sensors' surface reflectance sources (HDF-EOS granules, GeoTIFF exports),
monthly compositing, ancillary data, the tasks of an ingest, the input-cube contract, units,
the Andalusia-MSMTU layout. The ingest's driver is :mod:`msmtu_batch.orchestration.ingest`."""
