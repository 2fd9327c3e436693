"""Object stores (plugins `local` and `s3`), the versioned model catalog, and run-checkpoint sync."""

from services.stores.base import (ObjectNotFound, ObjectStore, StoreAccessDenied, StoreError, StoreUnavailable,
                                  open_store)

__all__ = ["ObjectNotFound", "ObjectStore", "StoreAccessDenied", "StoreError", "StoreUnavailable", "open_store"]
