"""How train asks Ray for its workers: resources and strategy from the config, never a machine."""

from __future__ import annotations

from pipeline.config import TrainConfig
from stages.train import placement, scaling_config
from stages.train.precision import TRAIN_WORKER_CPUS


def test_default_workers_hold_a_cpu_workers_threads_or_one_gpu():
    cpu = scaling_config(TrainConfig(num_workers=2))
    assert (cpu.num_workers, cpu.use_gpu, cpu.placement_strategy) == (2, False, "PACK")
    assert cpu.resources_per_worker == {"CPU": TRAIN_WORKER_CPUS}
    gpu = scaling_config(TrainConfig(num_workers=8, use_gpu=True, batch_size=8))
    assert gpu.use_gpu and gpu.resources_per_worker == {"GPU": 1}


def test_resources_and_strategy_come_from_the_config():
    tc = TrainConfig(num_workers=16, batch_size=80, use_gpu=True, resources_per_worker={"GPU": 1, "CPU": 6, "trainer": 1},
                     placement_strategy="SPREAD")  # fmt: skip
    sc = scaling_config(tc)
    assert sc.resources_per_worker == {"GPU": 1, "CPU": 6, "trainer": 1} and sc.placement_strategy == "SPREAD"
    assert sc.num_workers == 16


def test_placement_counts_distinct_nodes():
    workers = [{"rank": 0, "node_id": "a"}, {"rank": 1, "node_id": "b"}, {"rank": 2, "node_id": "a"}]
    assert placement(workers) == {"nodes": 2, "workers": workers}
    assert placement(workers[:1])["nodes"] == 1


def test_placement_is_not_part_of_the_train_key():
    """Where workers run changes nothing they compute: moving them must not retrain."""
    from pipeline.config import RunConfig

    a = RunConfig(train=TrainConfig(placement_strategy="PACK"))
    b = RunConfig(train=TrainConfig(placement_strategy="SPREAD", resources_per_worker={"CPU": 1, "trainer": 1}))
    assert a.hash_of("train") == b.hash_of("train")


def test_a_tensor_parallel_engine_keeps_its_gpus_on_one_node():
    from pipeline.config import VLLMSampler
    from stages.sample.vllm import processor_config

    tp = processor_config(VLLMSampler(use_gpu=True, tensor_parallel_size=4, replicas=2), "/models/m")
    group = tp.placement_group_config
    assert group["strategy"] == "STRICT_PACK" and [b["GPU"] for b in group["bundles"]] == [1, 1, 1, 1]
    assert tp.concurrency == 2 and tp.engine_kwargs["tensor_parallel_size"] == 4
    one = processor_config(VLLMSampler(use_gpu=True, replicas=8), "s3://bucket/run/round-0/train/s1/checkpoint")
    assert one.placement_group_config is None  # Ray Data's default: one GPU per engine, anywhere
    assert one.model_source == "s3://bucket/run/round-0/train/s1/checkpoint"  # Ray fetches it on the engine's node
