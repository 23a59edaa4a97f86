from __future__ import annotations

from typing import Any

from shoal.router.catalog import DeclaredCatalog, declarations_from_resources


def _model(name: str, served: str | None = None, source: str = "org/weights") -> dict[str, Any]:
    model: dict[str, Any] = {"name": source}
    if served is not None:
        model["servedName"] = served
    return {"metadata": {"name": name}, "spec": {"model": model}}


def _adapter(name: str, base: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"baseModel": base, "source": "file:///x"}}


def test_resources_become_served_names_with_parents() -> None:
    got = declarations_from_resources(
        [_model("llama", served="llama-8b"), _model("mistral", source="mistralai/M-7B")],
        [_adapter("sql", "llama"), _adapter("orphan", "no-such-model")],
    )
    assert got == {"llama-8b": None, "mistralai/M-7B": None, "sql": "llama-8b"}


def test_malformed_resources_are_skipped() -> None:
    got = declarations_from_resources(
        [{"metadata": {"name": "x"}}, {"spec": {"model": {"name": "y"}}}, _model("ok")],
        [{"metadata": {"name": "a"}}],
    )
    assert got == {"org/weights": None}


def test_sources_replace_their_own_entries_and_merge() -> None:
    catalog = DeclaredCatalog()
    catalog.set_source("config", {"a": None})
    catalog.set_source("kubernetes", {"b": None, "b-lora": "b"})
    lora = catalog.get("b-lora")
    assert lora is not None and lora.base == "b" and lora.parent == "b"
    catalog.set_source("kubernetes", {"c": None})
    assert [d.name for d in catalog.entries()] == ["a", "c"]
    assert catalog.get("b") is None


def test_catalog_is_bounded_and_counts_what_it_drops() -> None:
    catalog = DeclaredCatalog(max_entries=3)
    catalog.set_source("config", {"a": None, "b": None})
    catalog.set_source("kubernetes", {f"m{i}": None for i in range(5)})
    assert len(catalog) == 3
    assert catalog.dropped == 4
