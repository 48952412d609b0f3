"""A simulated two-node Ray cluster (``ray.cluster_utils.Cluster``) on this machine: both nodes
score, and a node lost mid-run costs a retry, not an image."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.ray_helpers import ray
from memexport.distributed.ray import RayOptions, cluster_pool, scores_dataset, scores_from_images_on_ray
from memexport.runtime.batch import PredictOptions
from tests.models import write_tiny_scorer
from tests.scoring import rows, write_copies

STORE = {"object_store_memory": 150 * 1024**2}


@pytest.fixture()
def two_nodes():
    """A head and a worker node, 1 CPU each, with this process connected as the driver."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, **STORE})
    worker = cluster.add_node(num_cpus=1, **STORE)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_work_spreads_over_both_nodes(two_nodes, tmp_path, data_dir):
    model = write_tiny_scorer(tmp_path / "tiny.onnx")
    folder = write_copies(tmp_path / "images", data_dir / "china.jpg", 64)
    options = RayOptions(batch_size=4, device="cpu", reserve_cpus=0)
    pool = cluster_pool(model, options)
    assert (pool.actors, pool.cpus) == (2, 1.0)  # one 1-CPU actor per node
    paths = ray.data.from_items([{"path": str(p)} for p in sorted(folder.iterdir())], override_num_blocks=16)
    # Start work only once both actors are up: on a loaded machine the first one could otherwise
    # finish all 16 blocks before the second has loaded the model.
    context = ray.data.DataContext.get_current()
    previous, context.wait_for_min_actors_s = context.wait_for_min_actors_s, 300
    try:
        table = scores_dataset(paths, model, options, pool).to_pandas()
    finally:
        context.wait_for_min_actors_s = previous
    assert sorted(Path(p).name for p in table["path"]) == sorted(p.name for p in folder.iterdir())
    nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert set(table["node"]) == nodes and len(nodes) == 2  # both nodes scored images
    assert table["error"].isna().all()


@pytest.mark.slow
def test_a_node_lost_mid_run_costs_a_retry_not_an_image(two_nodes, tmp_path, data_dir):
    """One actor per node. The worker node is removed after the first rows arrive and a new node
    joins (as an autoscaler or KubeRay replaces it): the lost actor restarts there, its blocks
    are retried, and the job ends with every image exactly once."""
    cluster, worker = two_nodes
    model = write_tiny_scorer(tmp_path / "tiny.onnx")
    folder = write_copies(tmp_path / "images", data_dir / "china.jpg", 240)
    replaced: list[int] = []

    def progress(done: int, total: int) -> None:
        if not replaced:
            cluster.remove_node(worker)
            cluster.add_node(num_cpus=1, **STORE)
            replaced.append(done)

    summary = scores_from_images_on_ray(model, [folder], tmp_path / "scores.csv", PredictOptions(batch_size=4, device="cpu"), progress)
    assert replaced and replaced[0] < 240, "the node was not lost mid-run"
    names = [Path(row[0]).name for row in rows(tmp_path / "scores.csv")[1:]]
    assert len(names) == len(set(names)) == 240 and summary.scored == 240
