"""spd_kernels: Selective Projection Decay (AdamSPD) as a drop-in torch optimizer.

``AdamSPD`` is the optimizer; ``spd_kernels.reference`` is the pure-PyTorch
oracle every backend is tested against; ``spd_kernels.ops`` holds the fused
Triton kernels.
"""
from .groups import fine_tuning_param_groups
from .hyperparameters import Hyperparameters
from .optim import AdamSPD
from .reference import adam_spd_step_, reference_step
from .stats import NUM_STATS, STAT_NAMES

__all__ = ["AdamSPD", "Hyperparameters", "fine_tuning_param_groups", "adam_spd_step_", "reference_step", "NUM_STATS", "STAT_NAMES"]
__version__ = "0.1.0"
