"""cluster.yaml against Ray's own cluster-config schema, as `ray up` checks it (defaults filled
in by `prepare_config`, then `validate_config`), and configs/gpu/ against the cluster it names."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from jsonschema import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = yaml.safe_load((REPO / "cluster.yaml").read_text())
GPU_CONFIGS = sorted((REPO / "configs" / "gpu").glob("*.yaml"))


def validate(config: dict) -> None:
    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_is_valid_for_ray_up():
    validate(CLUSTER)
    gpu = CLUSTER["available_node_types"]["gpu_worker"]
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= CLUSTER["max_workers"]
    assert any("[gpu]" in cmd for cmd in CLUSTER["setup_commands"]), "the nodes install the gpu extra"
    assert "." in CLUSTER["file_mounts"].values(), "the repository travels to the nodes"
    from pipeline.quiet import RAY_WORKER_ENV

    for command in (c for c in CLUSTER["head_start_ray_commands"] + CLUSTER["worker_start_ray_commands"] if "ray start" in c):
        assert all(f"{k}={v}" in command for k, v in RAY_WORKER_ENV.items()), command  # what Ray's workers read


@pytest.mark.parametrize(
    "path, value, named",
    [
        (("available_node_types", "gpu_worker", "min_workers"), "one", "min_workers"),
        (("max_worker",), 3, "max_worker"),
        (("head_node_type",), "gpu_workers", "head_node_type"),
    ],
)
def test_a_broken_cluster_yaml_fails_with_the_field_named(path, value, named):
    broken = copy.deepcopy(CLUSTER)
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises((ValidationError, ValueError, KeyError)) as err:
        validate(broken)
    assert named in str(err.value).splitlines()[0] + str(getattr(err.value, "path", ""))


@pytest.mark.parametrize("config", GPU_CONFIGS, ids=lambda p: p.name)
def test_gpu_configs_load_and_fit_the_cluster(config):
    cfg = load_config(str(config), [])
    per_node = CLUSTER["available_node_types"]["gpu_worker"]["resources"].get("trainer", 0) or 8
    assert cfg.sampler.use_gpu and cfg.sampler.tensor_parallel_size <= per_node  # TP inside a node
    for tc in cfg.trains().values():
        assert tc.use_gpu and tc.dtype == "bfloat16" and tc.lr == 5e-7 and tc.method.beta == 0.1
        assert tc.batch_size == 80  # the paper's batch
        label = (tc.resources_per_worker or {}).get("trainer")
        if label:  # asks for the label the cluster's GPU nodes carry, never a machine
            assert "trainer" in CLUSTER["available_node_types"]["gpu_worker"]["resources"]
    text = config.read_text()
    assert "Needs:" in text, "each GPU config says what resources it needs"
    assert len(GPU_CONFIGS) >= 3
