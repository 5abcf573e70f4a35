"""Small helpers for experiments/run.py: instantiation, run-dir policy, rank-zero logging, CLI errors."""
from experiments.utils.errors import UserError, describe_user_error, report_user_errors
from experiments.utils.instantiators import instantiate_callbacks, instantiate_loggers
from experiments.utils.pylogger import get_logger
from experiments.utils.run_dir import (
    RunDirError,
    RunDirPlan,
    apply_run_dir_plan,
    hpc_checkpoints,
    plan_run_dir,
    previous_wandb_id,
)

__all__ = [
    "RunDirError",
    "RunDirPlan",
    "UserError",
    "apply_run_dir_plan",
    "describe_user_error",
    "get_logger",
    "hpc_checkpoints",
    "instantiate_callbacks",
    "instantiate_loggers",
    "plan_run_dir",
    "previous_wandb_id",
    "report_user_errors",
]
