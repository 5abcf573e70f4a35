"""A logger that speaks only on global rank zero (DDP processes would repeat every line)."""
import logging


class RankZeroLogger(logging.LoggerAdapter):
    """`logging.LoggerAdapter` whose messages are emitted on rank zero only (all ranks if `all_ranks=True`)."""

    def log(self, level, msg, *args, all_ranks: bool = False, **kwargs):
        from pytorch_lightning.utilities import rank_zero_only  # lazy: keeps `run.py --help` fast

        if all_ranks or rank_zero_only.rank == 0:
            super().log(level, msg, *args, **kwargs)


def get_logger(name: str = __name__) -> RankZeroLogger:
    """Returns a rank-zero-only logger named `name` (Hydra configures its handlers: console + run.log)."""
    return RankZeroLogger(logging.getLogger(name), {})
