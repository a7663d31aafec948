"""Mixture of efficient diffusion experts (Ganjdanesh et al., ECCV 2024, arXiv 2409.15557).

1. :mod:`.intervals`: gradient-alignment matrix over a timestep grid, exact contiguous clustering.
2. :mod:`.elastic`: elastic depth/width of a UNet by hooks (:mod:`.space`: the space and its MACs;
   :mod:`.elastic_stream`: the residual stream); random sub-networks. :mod:`.importance`: the
   importance order of its groups, heads and stream channels.
3. :mod:`.router`: the Expert Routing Agent that shares a MACs budget between the experts;
   :mod:`.selection`: its logits made sub-networks, and the selection brought to the budget.
4. :mod:`.prune`: physical pruning to the selected sub-networks; the mixture as one checkpoint.
"""

from .elastic import (
    ElasticController,
    ElasticSpace,
    ElasticUnit,
    StreamUnit,
    SubnetConfig,
    elastic_hook,
    elastic_space,
    sample_subnet,
)
from .importance import importance_orders, reorder_units, unit_importance
from .intervals import (
    Segmentation,
    alignment_matrix,
    auto_k,
    candidates,
    cutoff_curve,
    cuts_to_boundaries,
    grid_edges,
    objective,
    save_alignment_heatmap,
    outlier_row,
    seed_boundaries,
    segment,
    timestep_gradients,
    timestep_grid,
    uniform_boundaries,
    uniform_cuts,
)
from .prune import (ExpertMixtureModel, ShortcutBlock, SkippedBlock, load_mixture, prune_to_config,
                    save_mixture)
from .router import ExpertRoutingAgent, RouterResult, resource_loss, train_router
from .selection import RelaxedSubnet, calibrate, mixture_macs, relax, select, steps_per_expert

__all__ = [
    "ElasticController", "ElasticSpace", "ElasticUnit", "StreamUnit", "SubnetConfig", "elastic_hook", "elastic_space",
    "importance_orders", "reorder_units", "sample_subnet", "unit_importance",
    "Segmentation", "alignment_matrix", "auto_k", "candidates", "cutoff_curve", "cuts_to_boundaries", "grid_edges", "objective",
    "outlier_row", "save_alignment_heatmap", "seed_boundaries", "segment", "timestep_gradients", "timestep_grid", "uniform_boundaries", "uniform_cuts",
    "ExpertMixtureModel", "ShortcutBlock", "SkippedBlock", "load_mixture", "prune_to_config", "save_mixture",
    "ExpertRoutingAgent", "RelaxedSubnet", "RouterResult", "calibrate", "relax", "resource_loss", "select", "steps_per_expert",
    "train_router", "mixture_macs",
]
