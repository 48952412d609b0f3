"""A simulated two-node Ray cluster (``ray.cluster_utils.Cluster``) on this machine: both nodes score."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.ray_helpers import ray
from memexport.distributed.ray import RayOptions, cluster_pool, scores_dataset
from tests.models import write_tiny_scorer


@pytest.mark.slow
def test_work_spreads_over_both_nodes(tmp_path, data_dir):
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 150 * 1024**2})
    cluster.add_node(num_cpus=1, object_store_memory=150 * 1024**2)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        model = write_tiny_scorer(tmp_path / "tiny.onnx")
        folder = tmp_path / "images"
        folder.mkdir()
        data = (data_dir / "china.jpg").read_bytes()
        for index in range(64):
            (folder / f"img_{index:03d}.jpg").write_bytes(data)
        options = RayOptions(batch_size=4, device="cpu", reserve_cpus=0)
        pool = cluster_pool(model, options)
        assert (pool.actors, pool.cpus) == (2, 1.0)  # one 1-CPU actor per node
        paths = ray.data.from_items([{"path": str(p)} for p in sorted(folder.iterdir())], override_num_blocks=16)
        table = scores_dataset(paths, model, options, pool).to_pandas()
        assert sorted(Path(p).name for p in table["path"]) == sorted(p.name for p in folder.iterdir())
        nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        assert set(table["node"]) == nodes and len(nodes) == 2  # both nodes scored images
        assert table["error"].isna().all()
    finally:
        ray.shutdown()
        cluster.shutdown()
