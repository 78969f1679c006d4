"""activation-shuffler core: shard format, storage, manifest, dataset reading, and the external shuffle."""

from .dataset import Batch, Dataset
from .errors import ChecksumError, DatasetNotFoundError, FormatError, SchemaError
from .manifest import Fingerprint, Manifest
from .schema import Schema
from .shuffle import shuffle
from .storage import Storage

__all__ = [
    "Batch",
    "ChecksumError",
    "Dataset",
    "DatasetNotFoundError",
    "Fingerprint",
    "FormatError",
    "Manifest",
    "Schema",
    "SchemaError",
    "Storage",
    "shuffle",
]
