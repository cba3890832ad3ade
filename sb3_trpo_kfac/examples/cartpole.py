"""Train TRPO on CartPole-v1 with rl-zoo3's tuned settings, evaluate it, and print the mean return."""

from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from sb3_trpo_kfac import TRPO


def main() -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    model = TRPO(
        "MlpPolicy", env, n_steps=512, batch_size=512, cg_damping=1e-3, gae_lambda=0.98, n_critic_updates=20, seed=0
    )
    model.learn(total_timesteps=50_000)
    mean, std = evaluate_policy(model, make_vec_env("CartPole-v1", n_envs=1, seed=1), n_eval_episodes=10)
    print(f"TRPO on CartPole-v1 after 50k steps: mean return {mean:.1f} +/- {std:.1f} over 10 episodes")


if __name__ == "__main__":
    main()
