"""Each stage declares the config blocks it reads (`Stage.config_blocks`): its key hashes exactly
those, so a block it reads but does not declare would let a config edit go unnoticed (a stale
artifact handed back). This reads the stages' source and checks the declarations cover every
`cfg.<block>` they touch.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from pipeline.config import RunConfig
from pipeline.runner import STAGES

BLOCKS = set(RunConfig.model_fields)


def _sources(modules: tuple[str, ...]) -> list[Path]:
    files = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin)
        files += sorted(origin.parent.rglob("*.py")) if spec.submodule_search_locations else [origin]
    return files


def blocks_read(source: str) -> set[str]:
    """Top-level config blocks read as `cfg.<block>` inside functions that take `cfg: RunConfig`
    (elsewhere `cfg` may be one block, e.g. `cfg: PairsConfig`). Every parameter annotated
    `RunConfig` must be called `cfg`, so no read hides behind another name."""
    read = set()
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        takes_run_config = False
        for arg in fn.args.args + fn.args.kwonlyargs:
            if arg.annotation is not None and ast.unparse(arg.annotation).strip("'\"") == "RunConfig":
                assert arg.arg == "cfg", f"{fn.name}: a RunConfig parameter named {arg.arg!r}: call it cfg"
                takes_run_config = True
        if takes_run_config:
            read |= {node.attr for node in ast.walk(fn) if isinstance(node, ast.Attribute)
                     and isinstance(node.value, ast.Name) and node.value.id == "cfg" and node.attr in BLOCKS}
    return read


def test_the_scanner_sees_reads():
    assert blocks_read("def run(cfg: RunConfig, inputs, out):\n    return cfg.train.lr, cfg.judge\n") == {"train", "judge"}
    assert blocks_read("def pick(cfg: PairsConfig):\n    return cfg.seed\n") == set()
    with pytest.raises(AssertionError, match="call it cfg"):
        blocks_read("def run(config: RunConfig):\n    return config.train\n")


@pytest.mark.parametrize("name", list(STAGES))
def test_a_stage_declares_every_config_block_it_reads(name):
    stage = STAGES[name]
    read = set().union(*(blocks_read(f.read_text()) for f in _sources(stage.code)))
    assert read, f"{name}: no config read found (the scanner is broken)"
    undeclared = read - set(stage.config_blocks)
    assert not undeclared, f"stage {name!r} reads cfg.{', cfg.'.join(sorted(undeclared))} but does not declare it"
