"""activation-shuffler core: shard format, storage, manifest, dataset reading, and the external shuffle."""

from shuffler.errors import ChecksumError, DatasetNotFoundError, FormatError, SchemaError
from shuffler.format.manifest import Fingerprint, Manifest
from shuffler.format.schema import Schema
from shuffler.io.dataset import Batch, Dataset
from shuffler.shuffling.run import shuffle
from shuffler.storage.storage import Storage

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
