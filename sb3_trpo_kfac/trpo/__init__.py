from sb3_trpo_kfac.trpo.policies import CnnPolicy, MlpPolicy, MultiInputPolicy
from sb3_trpo_kfac.trpo.trpo import TRPO

__all__ = ["TRPO", "CnnPolicy", "MlpPolicy", "MultiInputPolicy"]
