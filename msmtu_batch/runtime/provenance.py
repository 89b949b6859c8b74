"""The software's own identity, recorded in everything it writes (manifests, cubes, artifacts)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("msmtu-batch")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
