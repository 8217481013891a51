"""Slurm `srun` launches: the SLURM_* environment of a job step becomes RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*."""
from megatrain.distributed.env import first_host, slurm_env

STEP = {"SLURM_JOB_ID": "123456", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08,11]"}


def test_job_step_maps_to_torch_variables():
    assert slurm_env(STEP) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                               "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 123456 % 20000)}


def test_explicit_master_and_launcher_variables_win():
    got = slurm_env({**STEP, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert (got["MASTER_ADDR"], got["MASTER_PORT"]) == ("10.0.0.1", "29500")
    assert slurm_env({**STEP, "RANK": "0"}) == {}  # torchrun/deepspeed inside srun already set the ranks


def test_batch_script_or_salloc_shell_is_one_rank():
    shell = {k: v for k, v in STEP.items() if not k.startswith("SLURM_STEP")}
    assert slurm_env(shell) == {}
    assert slurm_env({}) == {}


def test_first_host_of_node_lists():
    assert first_host("node001") == "node001"
    assert first_host("gpu[03-04,09],cpu1") == "gpu03"
    assert first_host("a1,b[2-3]") == "a1"
    assert first_host("rack[9,10-12]") == "rack9"
