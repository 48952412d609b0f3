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


@pytest.mark.slow
def test_a_node_lost_mid_run_costs_a_retry_not_an_image(tmp_path, data_dir):
    """Two 1-CPU nodes, one actor each. The worker node is removed after the first rows arrive and
    a new node joins (as an autoscaler or KubeRay replaces it): the lost actor restarts there, its
    blocks are retried, and the job ends with every image exactly once."""
    from ray.cluster_utils import Cluster

    from memexport.distributed.ray import scores_from_images_on_ray
    from memexport.runtime.batch import PredictOptions
    from tests.distributed.ray_helpers import rows

    if ray.is_initialized():
        ray.shutdown()
    store = {"object_store_memory": 150 * 1024**2}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, **store})
    worker = cluster.add_node(num_cpus=1, **store)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        model = write_tiny_scorer(tmp_path / "tiny.onnx")
        folder = tmp_path / "images"
        folder.mkdir()
        data = (data_dir / "china.jpg").read_bytes()
        for index in range(240):
            (folder / f"img_{index:03d}.jpg").write_bytes(data)
        replaced: list[int] = []

        def progress(done: int, total: int) -> None:
            if not replaced:
                cluster.remove_node(worker)
                cluster.add_node(num_cpus=1, **store)
                replaced.append(done)

        summary = scores_from_images_on_ray(model, [folder], tmp_path / "scores.csv", PredictOptions(batch_size=4, device="cpu"), progress)
        assert replaced and replaced[0] < 240, "the node was not lost mid-run"
        names = [Path(row[0]).name for row in rows(tmp_path / "scores.csv")[1:]]
        assert len(names) == len(set(names)) == 240 and summary.scored == 240
    finally:
        ray.shutdown()
        cluster.shutdown()
