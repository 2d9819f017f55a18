"""musclenode: a DICOM node for lumbar paraspinal muscle segmentation and measurement.

The ``node`` package holds networking and orchestration: the DICOM SCP, the durable
store and its index, series assembly, selection rules, configuration and the command line.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("musclenode")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

#: Sent in association requests and file meta so that peers' logs name this software.
IMPLEMENTATION_VERSION_NAME = "MUSCLENODE_01"
