from sb3_trpo_kfac.acktr.acktr import ACKTR
from sb3_trpo_kfac.acktr.policies import CnnPolicy, MlpPolicy, MultiInputPolicy

__all__ = ["ACKTR", "CnnPolicy", "MlpPolicy", "MultiInputPolicy"]
