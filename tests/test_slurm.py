"""Processes that `srun` starts without torchrun take their ranks from SLURM's variables."""

import pytest

from instdisc.dist import _first_host, slurm_env
from instdisc.errors import UserError

STEP = {"SLURM_STEP_ID": "0", "SLURM_JOB_ID": "123456", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16",
        "SLURM_PROCID": "11", "SLURM_LOCALID": "3", "SLURM_STEP_NODELIST": "gpu[07-08]"}


def test_an_srun_task_gets_its_rank_world_local_rank_and_a_rendezvous():
    assert slurm_env(STEP) == {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3",
                               "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 123456 % 20000)}
    # The environment's MASTER_ADDR/PORT win; SLURM_NTASKS serves when the step count is absent.
    given = {**STEP, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29400"}
    del given["SLURM_STEP_NUM_TASKS"]
    assert slurm_env(given) == {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3",
                                "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29400"}


def test_outside_a_multi_task_step_nothing_is_set():
    batch_shell = {k: v for k, v in STEP.items() if k != "SLURM_STEP_ID"}  # sbatch's own shell: no step
    assert slurm_env(batch_shell) == {}
    assert slurm_env({**STEP, "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}) == {}
    assert slurm_env({}) == {}


def test_bad_slurm_variables_are_user_errors_naming_them():
    with pytest.raises(UserError, match=r"\$SLURM_PROCID must be an integer"):
        slurm_env({**STEP, "SLURM_PROCID": "x"})
    with pytest.raises(UserError, match="MASTER_ADDR"):
        slurm_env({k: v for k, v in STEP.items() if k != "SLURM_STEP_NODELIST"})


@pytest.mark.parametrize("nodes,first", [
    ("node1", "node1"), ("a1,b2", "a1"), ("gpu[07-09,12],cpu3", "gpu07"), ("gnode[10,20,25,37]", "gnode10"),
    ("rack[2-3]-n[004-006]", "rack2-n004"), ("c[1,3]x,d", "c1x"),
])
def test_first_host_of_a_hostlist(nodes, first):
    assert _first_host(nodes) == first
