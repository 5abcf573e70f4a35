"""Two "nodes" on the loopback address: `torchrun --nnodes=2 --nproc_per_node=1 --node_rank={0,1}` each starting
experiments/run.py (`trainer=multinode_cpu`, gloo), a tiny stage-1 training with a checkpoint, then its test.

What a multi-node run must get right and this checks: Lightning takes ranks and world size from torchrun
(TorchElasticEnvironment), the two processes form one process group, both write into the one run directory
given on the command line, and exactly one set of outputs lands there (configs, checkpoints, hand-off and
metrics written by global rank 0 only), with every test image in metrics/test.csv once.
"""
import pytest
from omegaconf import OmegaConf

from networks.encoder_checkpoints import load_e4e_checkpoint
from tests.helpers.distributed_runs import (
    ROOT,
    clean_env,
    free_port,
    probe_overrides,
    start,
    tiny_e4e_overrides,
    tiny_stage1_inputs,
    torchrun,
    wait_all,
)
from tests.helpers.rank_probe import read_probes

pytestmark = pytest.mark.usefixtures("single_thread")

HELD_OUT = ["0", "4", "5"]  # data.val_count=3 of the 7 images (the image folder's seeded split)


def test_two_torchrun_nodes_train_and_test_into_one_run_dir(tmp_path):
    images, generator = tiny_stage1_inputs(tmp_path)
    run, probes = tmp_path / "run", tmp_path / "probes"
    overrides = [*tiny_e4e_overrides(images, generator), "trainer=multinode_cpu", "trainer.num_nodes=2",
                 "trainer.devices=1", f"paths.run_dir={run}", *probe_overrides(probes)]
    port = free_port()
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    procs = [start(torchrun(rank, 2, port, *overrides), clean_env(), log, cwd=ROOT) for rank, log in zip((0, 1), logs)]
    wait_all(procs, logs, timeout=300)
    out = [log.read_text() for log in logs]

    # both processes: one gloo group of 2 built from torchrun's variables, node rank = torchrun's --node_rank
    for stage in ("fit", "test"):
        records = read_probes(probes, stage)
        assert sorted(records) == [0, 1], f"{stage}: records of ranks {sorted(records)}"
        for rank, r in records.items():
            assert (r["world_size"], r["process_group_size"], r["num_nodes"], r["num_devices"]) == (2, 2, 2, 1)
            assert r["environment"] == "TorchElasticEnvironment" and r["backend"] == "gloo"
            assert r["node_rank"] == rank and r["local_rank"] == 0 and r["is_global_zero"] == (rank == 0)
            assert r["gathered_ranks"] == [0, 1]  # a real all_gather over the group
            assert r["default_root_dir"] == str(run.resolve())
    fit = read_probes(probes, "fit")
    assert fit[0]["global_step"] == fit[1]["global_step"] == 4
    test = read_probes(probes, "test")
    # the distributed sampler split the 3 held-out images over the 2 ranks (padding the odd one out)
    assert sorted(set(test[0]["test_names"]) | set(test[1]["test_names"])) == HELD_OUT
    assert test[0]["test_names"] != test[1]["test_names"]

    # one set of outputs, written by global rank 0 (torchrun node 0) only
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "checkpoints", "config.yaml", "csv", "encoder.pt",
                                                     "metrics", "reconstructions", "run.log"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step_0000004.ckpt"]
    assert sorted(p.name for p in (run / "csv").iterdir()) == ["version_0"]
    assert sorted(p.name for p in (run / "metrics").iterdir()) == ["test.csv", "test.json"]
    assert OmegaConf.load(run / "config.yaml").paths.run_dir == str(run.resolve())
    assert OmegaConf.load(run / "config.yaml").trainer.num_nodes == 2
    assert load_e4e_checkpoint(run / "encoder.pt").encoder.config["input_size"] == 16
    assert f"Hand-off written: {run.resolve() / 'encoder.pt'}" in out[0]
    assert "Hand-off written" not in out[1] and "Per-image metrics" not in out[1]

    # every held-out image exactly once in the per-image metrics (rows gathered from both ranks, padding dropped)
    rows = (run / "metrics" / "test.csv").read_text().splitlines()
    assert rows[0].startswith("name,mse,psnr,ssim")
    names = [row.split(",")[0] for row in rows[1:]]
    assert sorted(names) == HELD_OUT, f"test.csv rows {names}: expected each of {HELD_OUT} once (both ranks' images)"
