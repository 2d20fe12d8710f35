"""tilerseg: seam-exact, out-of-core tiled segmentation of images too large for memory.

Data flow: ``open_reader(path)`` -> lazy reads -> ``engine`` (dask tasks of
overlap-tile windows) -> ``open_writer(out)`` storing chunk by chunk."""
from .api import RunReport, UntrainedModelWarning, run, segment
from .errors import TilersegError

__version__ = "0.1.0"
__all__ = ["run", "segment", "RunReport", "TilersegError", "UntrainedModelWarning", "__version__"]
