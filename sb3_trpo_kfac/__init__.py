"""Second-order on-policy RL for Stable-Baselines3: TRPO and ACKTR (K-FAC)."""

from sb3_trpo_kfac.trpo import TRPO
from sb3_trpo_kfac.version import __version__

__all__ = ["TRPO", "__version__"]
