"""The model store: names, Modelfiles, GGUF metadata, capabilities and the on-disk store."""

from .modelfile import Modelfile, ModelfileError, parse_modelfile
from .names import InvalidModelName, ModelName, parse_name
from .store import ModelEntry, ModelNotFound, Store, StoreError

__all__ = [
    "InvalidModelName",
    "ModelEntry",
    "ModelName",
    "ModelNotFound",
    "Modelfile",
    "ModelfileError",
    "Store",
    "StoreError",
    "parse_modelfile",
    "parse_name",
]
