"""Inputs: MODIS sources, monthly compositing, ancillary data, ingest, the input-cube contract,
units, the Andalusia-MSMTU layout."""
