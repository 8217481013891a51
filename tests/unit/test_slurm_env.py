"""Launchers that export no RANK: a Slurm `srun` job step and MPI (SLURM_* / OMPI_* / PMI_* become RANK/WORLD_SIZE/
LOCAL_RANK/MASTER_*), and accelerate's plugins that would configure a second DeepSpeed (refused)."""
import pytest

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


def test_mpi_environment_is_mapped():
    from megatrain.distributed.env import mpi_env
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29511"}
    assert mpi_env(env) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29511"}
    assert mpi_env({"PMI_RANK": "0", "PMI_SIZE": "2"})["WORLD_SIZE"] == "2"
    assert mpi_env({**env, "RANK": "0"}) == {}  # a launcher that exports RANK wins
    assert mpi_env({}) == {}


@pytest.mark.parametrize("flag", ["ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"])
def test_accelerate_plugins_are_refused_in_one_line(flag):
    from megatrain.distributed.env import launcher_env
    from megatrain.errors import ConfigError
    with pytest.raises(ConfigError) as err:
        launcher_env({flag: "true"})
    assert "\n" not in str(err.value) and "accelerate launch" in str(err.value)
    assert launcher_env({flag: "false"}) == {}


@pytest.mark.parametrize("argv,refused", [
    (["accelerate", "launch", "--cpu", "--num_processes", "2", "train.py"], True),
    (["python", "-m", "accelerate.commands.launch", "--num-processes=4", "--cpu", "train.py"], True),
    (["accelerate", "launch", "--cpu", "--num_processes", "1", "train.py"], False),
    (["accelerate", "launch", "--cpu", "train.py"], False),
])
def test_accelerate_cpu_with_several_processes_is_one_line(argv, refused):
    """accelerate --cpu runs one process whatever --num_processes says: asking for more is refused, not
    silently trained as one rank (the launcher's argv is read from /proc in a real launch)."""
    from megatrain.distributed.env import check_accelerate
    from megatrain.errors import ConfigError
    env = {"ACCELERATE_USE_CPU": "True"}
    if not refused:
        check_accelerate(env, parent_argv=argv)
        return
    with pytest.raises(ConfigError) as err:
        check_accelerate(env, parent_argv=argv)
    assert "\n" not in str(err.value) and "--multi_gpu" in str(err.value)
    check_accelerate({**env, "RANK": "0"}, parent_argv=argv)  # under mpirun the ranks are real: left alone


@pytest.mark.parametrize("env", [
    {**STEP, "SLURM_STEP_NUM_TASKS": "eight"}, {**STEP, "SLURM_PROCID": ""}, {**STEP, "SLURM_STEP_NUM_NODES": "-2"},
    {"OMPI_COMM_WORLD_RANK": "x", "OMPI_COMM_WORLD_SIZE": "2"}, {"PMI_RANK": "0", "PMI_SIZE": "two"},
])
def test_a_broken_launcher_environment_is_one_line(env):
    from megatrain.distributed.env import launcher_env
    from megatrain.errors import ConfigError
    with pytest.raises(ConfigError) as err:
        launcher_env(env)
    assert "\n" not in str(err.value) and str(err.value).startswith("environment ")
