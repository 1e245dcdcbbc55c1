"""The public surface, pinned: any change to it shows up as a diff here."""

from __future__ import annotations

import columnhub
import columnhub.cache
import columnhub.errors
import columnhub.inference
import columnhub.join


def public(module: object) -> list[str]:
    return sorted(n for n in dir(module) if not n.startswith("_"))


def test_top_level() -> None:
    assert sorted(columnhub.__all__) == [
        "Client", "ColumnhubError", "DatasetSpec", "FriendSpec", "ModelSpec", "OutputSpec", "Request",
        "Result", "Samples", "__version__", "arrays", "deliver", "load_request",
    ]
    for name in columnhub.__all__:
        assert hasattr(columnhub, name)


def test_every_error_is_a_columnhub_error_and_a_builtin() -> None:
    for name in columnhub.errors.__all__:
        obj = getattr(columnhub.errors, name)
        if isinstance(obj, type):
            assert issubclass(obj, columnhub.errors.ColumnhubError), name
    assert issubclass(columnhub.errors.ColumnNotFoundError, KeyError)
    assert issubclass(columnhub.errors.SourceTimeoutError, TimeoutError)
    assert str(columnhub.errors.ColumnNotFoundError("no 'x'")) == "no 'x'"  # not repr()'d


def test_subpackages() -> None:
    assert sorted(columnhub.cache.__all__) == [
        "CacheStats", "ColumnCache", "ColumnLookup", "GCReport", "canonical_json", "default_location",
        "entry_key", "is_valid_key",
    ]
    assert {"KeyIndex", "match", "gather", "join_arrays", "unmatched_rows"} <= set(
        columnhub.join.__all__
    )
    assert {"ModelRegistry", "ModelCard", "predict", "InferenceMetrics"} <= set(
        columnhub.inference.__all__
    )
