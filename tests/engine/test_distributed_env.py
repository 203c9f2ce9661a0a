import pytest

from tensorpoly_ds.engine.distributed import LaunchError, distributed_env, expand_nodelist, slurm_port


def test_expand_nodelist():
    assert expand_nodelist("node[1-2]") == ["node1", "node2"]
    assert expand_nodelist("gpu[08-10,12],login1") == ["gpu08", "gpu09", "gpu10", "gpu12", "login1"]
    assert expand_nodelist("single") == ["single"]
    assert expand_nodelist("a[3],b[1-2]-ib") == ["a3", "b1-ib", "b2-ib"]
    with pytest.raises(LaunchError):
        expand_nodelist("bad[1-2")


def srun_env(**kw):
    env = {
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "4",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_JOB_ID": "123456",
    }
    env.update(kw)
    return env


def test_srun_mapping():
    out = distributed_env(srun_env())
    assert out["LAUNCHER"] == "srun"
    assert (out["RANK"], out["LOCAL_RANK"], out["WORLD_SIZE"], out["MASTER_ADDR"]) == ("3", "1", "4", "node1")
    assert out["MASTER_PORT"] == str(slurm_port("123456"))
    assert 20000 <= int(out["MASTER_PORT"]) < 40000


def test_srun_array_tasks_get_distinct_ports_and_explicit_port_wins():
    a = distributed_env(srun_env(SLURM_ARRAY_TASK_ID="0"))["MASTER_PORT"]
    b = distributed_env(srun_env(SLURM_ARRAY_TASK_ID="1"))["MASTER_PORT"]
    assert a != b
    assert distributed_env(srun_env(MASTER_PORT="4242"))["MASTER_PORT"] == "4242"
    assert distributed_env(srun_env(MASTER_ADDR="head"))["MASTER_ADDR"] == "head"


def test_array_tasks_derive_the_port_from_the_array_job_id():
    a = distributed_env(srun_env(SLURM_JOB_ID="501", SLURM_ARRAY_JOB_ID="500", SLURM_ARRAY_TASK_ID="0"))
    b = distributed_env(srun_env(SLURM_JOB_ID="502", SLURM_ARRAY_JOB_ID="500", SLURM_ARRAY_TASK_ID="1"))
    assert a["MASTER_PORT"] == str(slurm_port("500", "0")) and b["MASTER_PORT"] == str(slurm_port("500", "1"))
    assert a["MASTER_PORT"] != b["MASTER_PORT"]


def test_torchrun_and_deepspeed_variables_are_kept():
    env = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
        "TORCHELASTIC_RUN_ID": "x",
    }
    out = distributed_env(env)
    assert out["LAUNCHER"] == "torchrun"
    assert (out["RANK"], out["WORLD_SIZE"], out["LOCAL_RANK"], out["MASTER_ADDR"], out["MASTER_PORT"]) == (
        "1",
        "2",
        "1",
        "10.0.0.1",
        "29500",
    )
    env.pop("TORCHELASTIC_RUN_ID")
    env["CROSS_RANK"] = "0"  # deepspeed's launcher
    assert distributed_env(env)["LAUNCHER"] == "deepspeed"
    # torchrun inside an srun allocation: the launcher's variables win over Slurm's
    assert distributed_env({**srun_env(), **env})["RANK"] == "1"


def test_plain_python_is_one_process():
    out = distributed_env({})
    assert (out["LAUNCHER"], out["RANK"], out["WORLD_SIZE"], out["LOCAL_RANK"]) == ("python", "0", "1", "0")
    assert int(out["MASTER_PORT"]) > 0
    # an sbatch script running python without srun (no step id) is one process too
    assert distributed_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"})["WORLD_SIZE"] == "1"


def test_inconsistent_variables_rejected():
    with pytest.raises(LaunchError):
        distributed_env({"RANK": "2", "WORLD_SIZE": "2", "MASTER_PORT": "1"})
    with pytest.raises(LaunchError, match="MASTER_PORT"):
        distributed_env({"RANK": "0", "WORLD_SIZE": "2"})
