"""Storage backends: the products queue and the object bucket (``storage=`` in conf)."""

from tasks.storage.base import ProductStore, StorageSettings, StoreError, open_store

__all__ = ["ProductStore", "StorageSettings", "StoreError", "open_store"]
