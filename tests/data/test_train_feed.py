"""A stage-3 stream feeding a two-worker Ray Train loop through `get_dataset_shard`."""

from __future__ import annotations

import json

from kosmos_g.platform import storage
from kosmos_g.platform.data.datastream import DataConfig, collate_fn, training_dataset


def _loop(config: dict) -> None:
    import ray.train

    context = ray.train.get_context()
    model = config["model"]
    rows = 0
    for batch in ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=4, collate_fn=collate_fn(3, model)):
        assert batch["target_pixels"].shape[0] == batch["input_ids"].shape[0]
        assert int(batch["image_mask"].sum()) == batch["pixel_values"].shape[0] * model.mllm.image_tokens
        rows += batch["input_ids"].shape[0]
    storage.write_text(f"{config['out']}/rank-{context.get_world_rank()}.json", json.dumps({"rows": rows}))
    ray.train.report({"rows": rows})


def test_stream_feeds_two_train_workers(ray_local, sample_shards, tiny_cfg, s3_prefix, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    data = DataConfig(**sample_shards, samples_per_epoch=40, num_cpus=0.25, workers=1)
    dataset = training_dataset(3, data, tiny_cfg)
    trainer = TorchTrainer(
        _loop, train_loop_config={"model": tiny_cfg, "out": s3_prefix},
        # Fractional CPUs leave room for the data pipeline on the 2-CPU test cluster
        # (Ray Data's file-listing step always asks for one whole CPU).
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.25}),
        run_config=RunConfig(name="data-feed", storage_path=str(tmp_path)),
        datasets={"train": dataset},
    )
    trainer.fit()
    per_rank = [json.loads(storage.read_text(f"{s3_prefix}/rank-{rank}.json"))["rows"] for rank in (0, 1)]
    # Ray Train splits the stream into equal, disjoint shards that cover the epoch.
    assert per_rank[0] == per_rank[1] > 0
    assert abs(sum(per_rank) - 40) <= 10  # the blend's partial repeats are drawn per record
