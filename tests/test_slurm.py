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


def test_srun_ranks_outside_the_step_are_refused():
    with pytest.raises(UserError, match=r"\$SLURM_PROCID 16 is not a rank of this step's 16 tasks"):
        slurm_env({**STEP, "SLURM_PROCID": "16"})
    with pytest.raises(UserError, match=r"\$SLURM_STEP_NUM_TASKS must be a number of tasks >= 1"):
        slurm_env({**STEP, "SLURM_STEP_NUM_TASKS": "-3"})
    with pytest.raises(UserError, match=r"\$SLURM_LOCALID must be >= 0"):
        slurm_env({**STEP, "SLURM_LOCALID": "-1"})


def test_torchrun_variables_are_checked_before_any_rendezvous():
    from instdisc.dist import launch_ranks

    assert launch_ranks({}) == (0, 1, 0)
    assert launch_ranks({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}) \
        == (1, 2, 1)
    for env, needle in [({"WORLD_SIZE": "abc"}, r"\$WORLD_SIZE must be an integer"),
                        ({"WORLD_SIZE": "0"}, r"\$WORLD_SIZE must be >= 1"),
                        ({"LOCAL_RANK": "-1"}, r"\$LOCAL_RANK must be >= 0"),
                        ({"RANK": "2", "WORLD_SIZE": "2"}, r"\$RANK 2 is not a rank of \$WORLD_SIZE 2"),
                        ({"WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, r"\$RANK is not set"),
                        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "x"}, "MASTER_PORT must be")]:
        with pytest.raises(UserError, match=needle):
            launch_ranks(env)
