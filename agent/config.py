"""Settings of the learning agents, chosen for a short, expensive, sparse-reward search.

A search has a budget of a few hundred episodes, each a handful of decisions whose only
reward arrives at the end and costs a QAT evaluation. So: a replay buffer that keeps
every transition, learning that starts after a short warm-up of random episodes, frequent
updates of a small network, a quickly refreshed target network, and rewards scaled
towards one (CIM-AQ's reward reaches about a hundred).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DQNConfig:
    """Stable-Baselines3 ``DQN`` settings for the precision search.

    Attributes
    ----------
    learning_rate
        Adam step size of the Q-network.
    net_arch
        Hidden layer widths of the Q-network.
    warmup_fraction
        Share of the episode budget played at random before learning starts.
    exploration_fraction
        Share of the budget over which epsilon falls from ``exploration_initial_eps`` to
        ``exploration_final_eps``.
    exploration_initial_eps, exploration_final_eps
        Epsilon-greedy exploration at the start and after the decay.
    gamma
        Discount; 1 because episodes have a fixed, short length and a terminal reward.
    batch_size
        Transitions per gradient step.
    gradient_steps
        Gradient steps per environment step (evaluations are expensive, updates cheap).
    target_update_interval
        Environment steps between target-network refreshes.
    reward_scale
        Factor applied to rewards before learning (not to the logged rewards).
    latency_shaping
        Potential-based shaping of the learning reward by the projected latency, so each
        width choice is credited with its latency at once (returns are unchanged).
    """

    learning_rate: float = 3e-3
    net_arch: tuple[int, ...] = (64, 64)
    warmup_fraction: float = 0.1
    exploration_fraction: float = 0.5
    exploration_initial_eps: float = 1.0
    exploration_final_eps: float = 0.15
    gamma: float = 1.0
    batch_size: int = 64
    gradient_steps: int = 8
    target_update_interval: int = 32
    reward_scale: float = 0.01
    latency_shaping: bool = True


@dataclass(frozen=True)
class DDPGConfig:
    """Stable-Baselines3 ``DDPG`` settings of the HAQ / CIM-AQ baseline.

    Attributes
    ----------
    learning_rate
        Adam step size of actor and critic.
    net_arch
        Hidden layer widths of actor and critic (HAQ: 300, 300).
    warmup_fraction
        Share of the budget played at random before learning starts.
    noise_sigma, noise_decay
        Gaussian exploration noise on the ``[0, 1]`` action, multiplied by
        ``noise_decay`` after each episode (HAQ: 0.5 and 0.99).
    gamma, tau, batch_size, reward_scale
        As for ``DQNConfig``; ``tau`` is the soft target update rate.
    """

    learning_rate: float = 1e-3
    net_arch: tuple[int, ...] = (300, 300)
    warmup_fraction: float = 0.1
    noise_sigma: float = 0.5
    noise_decay: float = 0.99
    gamma: float = 1.0
    tau: float = 0.01
    batch_size: int = 64
    reward_scale: float = 0.01


@dataclass(frozen=True)
class TPEConfig:
    """Optuna ``TPESampler`` settings.

    Attributes
    ----------
    startup_fraction
        Share of the budget sampled at random before TPE models the results.
    multivariate
        Model the widths jointly rather than one by one.
    """

    startup_fraction: float = 0.1
    multivariate: bool = True


@dataclass(frozen=True)
class AgentConfig:
    """All agents' settings, in one place."""

    dqn: DQNConfig = field(default_factory=DQNConfig)
    ddpg: DDPGConfig = field(default_factory=DDPGConfig)
    tpe: TPEConfig = field(default_factory=TPEConfig)
