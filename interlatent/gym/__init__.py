"""Reinforcement-learning collection: ``GymCollector`` and small offline policies."""

from interlatent.gym.collector import GymCollector
from interlatent.gym.policies import MLPPolicy, cartpole_controller, cartpole_policy

__all__ = ["GymCollector", "MLPPolicy", "cartpole_controller", "cartpole_policy"]
