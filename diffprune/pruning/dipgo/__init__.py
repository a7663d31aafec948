"""DiP-GO: a diffusion pruner via few-step gradient optimisation (NeurIPS 2024, arXiv 2410.16942).

The learned result is data - a ``[T x N]`` skip schedule over the model's blocks - which
:class:`SkipScheduleDenoiser` runs inside the common sampler with real savings.
"""

from .graph import OUTPUT, BlockGraph, UNet2DGraph, block_graph, executed_blocks, needed_blocks
from .baselines import deepcache_cached_block, deepcache_for_macs, deepcache_schedule, random_schedule
from .pruner import ConsistencyLoss, GatePruner, ste_gates, train_pruner
from .schedule import BlockCosts, Schedule, block_costs, gate_table_macs, save_heatmap, schedule_from_scores
from .schedule import schedule_macs, skip_savings
from .supernet import GatedDenoiser, GatedRunner, SkipScheduleDenoiser
from .dit import DiTGraph, SkipScheduleDiT, guided_schedule_macs
from .sd import SDUNetGraph, SkipScheduleSD, guided_sd_schedule_macs
from .conditioned import ConditionedGraph, dit_conditioned, sd_conditioned

__all__ = [
    "OUTPUT", "BlockGraph", "UNet2DGraph", "block_graph", "executed_blocks", "needed_blocks",
    "ConsistencyLoss", "GatePruner", "ste_gates", "train_pruner",
    "deepcache_cached_block", "deepcache_for_macs", "deepcache_schedule", "random_schedule",
    "BlockCosts", "Schedule", "block_costs", "gate_table_macs", "save_heatmap", "schedule_from_scores",
    "schedule_macs", "skip_savings",
    "GatedDenoiser", "GatedRunner", "SkipScheduleDenoiser",
    "DiTGraph", "SkipScheduleDiT", "guided_schedule_macs",
    "SDUNetGraph", "SkipScheduleSD", "guided_sd_schedule_macs",
    "ConditionedGraph", "dit_conditioned", "sd_conditioned",
]
