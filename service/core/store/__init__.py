"""Where classes persist: the `ClassStore` interface the registry talks to, and its backends."""

from .base import ClassRecord, ClassStore, StoreChanges
from .directory import DirectoryStore
from .open import open_store, store_kind

__all__ = ["ClassRecord", "ClassStore", "DirectoryStore", "StoreChanges", "open_store", "store_kind"]
