"""The documentation keeps up with the code."""

from __future__ import annotations

from pathlib import Path

from teststand.sequences import REGISTRY

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_recipes_doc_lists_every_kind_and_parameter():
    text = (DOCS / "recipes.md").read_text()
    for kind, entry in REGISTRY.items():
        assert f"## `{kind}`" in text, kind
        for name in entry.params.model_fields:
            assert f"| `{name}` |" in text, f"{kind}.{name}"


def test_data_format_doc_names_every_root_attribute():
    text = (DOCS / "data-format.md").read_text()
    for key in (
        "format",
        "format_version",
        "run_id",
        "recipe",
        "kind",
        "status",
        "started_utc",
        "finished_utc",
        "software_version",
        "stand",
        "simulated",
        "settings_sha256",
        "/steps",
        "/hits",
        "/channels",
        "/truth",
        "/analysis",
        "n_triggers",
    ):
        assert key in text, key
