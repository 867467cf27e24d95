"""Names the stores accept. The queue and bucket semantics of every backend, the local one
included, are tested once in tests/test_storage_contract.py."""

from __future__ import annotations

import pytest

from tasks.storage import StoreError
from tasks.storage.base import check_object_key, check_unique_id


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", "x" * 65, "-lead", "semi;colon", "sp ace"])
def test_unsafe_unique_ids_are_refused(bad: str) -> None:
    with pytest.raises(StoreError, match="invalid unique_id"):
        check_unique_id(bad)


@pytest.mark.parametrize("bad", ["../x", "models/../../x", "/abs", "a//b", "models/x/"])
def test_unsafe_object_keys_are_refused(bad: str) -> None:
    with pytest.raises(StoreError, match="invalid object key"):
        check_object_key(bad)
