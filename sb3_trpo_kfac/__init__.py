"""Second-order on-policy RL for Stable-Baselines3: TRPO and ACKTR (K-FAC)."""

from sb3_trpo_kfac.acktr import ACKTR
from sb3_trpo_kfac.common.kfac import KFAC
from sb3_trpo_kfac.trpo import TRPO
from sb3_trpo_kfac.version import __version__

__all__ = ["ACKTR", "KFAC", "TRPO", "__version__"]
