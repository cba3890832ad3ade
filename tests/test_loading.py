"""
TRPO.load / ACKTR.load on files of the wrong kind: one clear error saying what the file holds and what was expected;
unreadable files are named as such; files of earlier versions, of sb3-contrib's TRPO (into TRPO) and file objects
still load.
"""

import base64
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch as th
from sb3_contrib import TRPO as ContribTRPO
from stable_baselines3 import A2C, DDPG, DQN, PPO, SAC
from stable_baselines3.common.envs import IdentityEnv, IdentityEnvBox, IdentityEnvMultiBinary

from sb3_trpo_kfac import ACKTR, TRPO
from sb3_trpo_kfac.common.validation import ArgumentError, ArgumentTypeError

DATA = Path(__file__).parent / "data"


def tiny() -> dict:
    return dict(net_arch=dict(pi=[4], vf=[4]))


MAKERS = {
    "trpo": lambda env: TRPO("MlpPolicy", env, n_steps=8, batch_size=8, policy_kwargs=tiny(), seed=0),
    "acktr": lambda env: ACKTR("MlpPolicy", env, n_steps=8, policy_kwargs=tiny(), seed=0),
    "a2c": lambda env: A2C("MlpPolicy", env, n_steps=8, policy_kwargs=tiny(), seed=0),
    "ppo": lambda env: PPO("MlpPolicy", env, n_steps=8, batch_size=8, n_epochs=1, policy_kwargs=tiny(), seed=0),
    "contrib_trpo": lambda env: ContribTRPO("MlpPolicy", env, n_steps=8, batch_size=8, policy_kwargs=tiny(), seed=0),
}


# off-policy algorithms, saved untrained: recognized by their policy classes' modules
OFF_POLICY = {
    "sac": lambda: SAC("MlpPolicy", IdentityEnvBox(), buffer_size=16, policy_kwargs=dict(net_arch=[4])),
    "ddpg": lambda: DDPG("MlpPolicy", IdentityEnvBox(), buffer_size=16, policy_kwargs=dict(net_arch=[4])),
    "dqn": lambda: DQN("MlpPolicy", IdentityEnv(2), buffer_size=16, policy_kwargs=dict(net_arch=[4])),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models trained for two updates (their optimizers have state) and saved, one per algorithm."""
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for name, make in MAKERS.items():
        paths[name] = folder / f"{name}.zip"
        make(IdentityEnv(2)).learn(16).save(paths[name])
    for name, make_off_policy in OFF_POLICY.items():
        paths[name] = folder / f"{name}.zip"
        make_off_policy().save(paths[name])
    return paths


@pytest.mark.parametrize(
    "algorithm, file, holds, hint",
    [
        (ACKTR, "trpo", "a TRPO model (saved by sb3_trpo_kfac), expected ACKTR", "sb3_trpo_kfac.TRPO.load"),
        (TRPO, "acktr", "an ACKTR model (saved by sb3_trpo_kfac), expected TRPO", "sb3_trpo_kfac.ACKTR.load"),
        (ACKTR, "a2c", "an A2C model (saved by stable-baselines3), expected ACKTR", "stable_baselines3.A2C.load"),
        (TRPO, "a2c", "an A2C model (saved by stable-baselines3), expected TRPO", "stable_baselines3.A2C.load"),
        (ACKTR, "ppo", "a PPO model (saved by stable-baselines3), expected ACKTR", "stable_baselines3.PPO.load"),
        (TRPO, "ppo", "a PPO model (saved by stable-baselines3), expected TRPO", "stable_baselines3.PPO.load"),
        (ACKTR, "contrib_trpo", "a TRPO model (saved by sb3-contrib), expected ACKTR", "sb3_contrib.TRPO.load"),
        (TRPO, "sac", "a SAC model (saved by stable-baselines3), expected TRPO", "stable_baselines3.SAC.load"),
        (ACKTR, "ddpg", "a DDPG model (saved by stable-baselines3), expected ACKTR", "stable_baselines3.DDPG.load"),
        (ACKTR, "dqn", "a DQN model (saved by stable-baselines3), expected ACKTR", "stable_baselines3.DQN.load"),
    ],
)
def test_another_algorithms_file_is_refused_saying_what_it_holds(saved, algorithm, file, holds, hint) -> None:
    with pytest.raises(ArgumentError) as raised:
        algorithm.load(saved[file])
    message = str(raised.value)
    assert message == f"`path` ({saved[file]}): this file holds {holds}; load it with {hint}"
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, AssertionError)


@pytest.mark.parametrize("algorithm, file", [(TRPO, "trpo"), (ACKTR, "acktr")])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_file_is_not_a_readable_model_zip(saved, tmp_path, algorithm, file, fraction) -> None:
    content = saved[file].read_bytes()
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(content[: int(fraction * len(content))])
    with pytest.raises(ArgumentError, match=rf"^`path` \({truncated}\): not a readable model zip \("):
        algorithm.load(truncated)


def test_a_zip_without_a_model_is_not_a_readable_model_zip(tmp_path) -> None:
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "not a model")
    with pytest.raises(ArgumentError, match="not a readable model zip .it has no 'data' entry"):
        TRPO.load(path)
    with pytest.raises(FileNotFoundError):  # a missing file stays what it is
        ACKTR.load(tmp_path / "missing.zip")


def test_a_file_needing_a_missing_module_keeps_its_import_error(saved, tmp_path) -> None:
    """Not a corrupt file: e.g. one saved under numpy 2 and read under numpy 1 (its pickles name numpy._core)."""
    path = tmp_path / "needs_a_module.zip"
    with zipfile.ZipFile(saved["trpo"]) as source, zipfile.ZipFile(path, "w") as target:
        for name in source.namelist():
            content = source.read(name)
            if name == "data":
                data = json.loads(content)
                pickled = b"cno_such_module_for_this_test\nThing\n."  # a pickle of a class from that module
                data["thing"] = {":type:": "<class 'type'>", ":serialized:": base64.b64encode(pickled).decode()}
                content = json.dumps(data).encode()
            target.writestr(name, content)
    with pytest.raises(ModuleNotFoundError, match="no_such_module_for_this_test"):
        TRPO.load(path)


@pytest.mark.parametrize("algorithm, file", [(TRPO, "trpo"), (ACKTR, "acktr")])
def test_own_files_load_from_paths_and_file_objects(saved, algorithm, file) -> None:
    original = algorithm.load(saved[file], device="cpu")
    buffer = io.BytesIO(saved[file].read_bytes())
    from_buffer = algorithm.load(buffer, env=IdentityEnv(2), device="cpu")  # read twice: checked, then loaded
    for p, q in zip(original.policy.parameters(), from_buffer.policy.parameters(), strict=True):
        assert th.equal(p, q)
    from_buffer.learn(16)


@pytest.mark.parametrize("algorithm, file", [(TRPO, "trpo_53c0b92.zip"), (ACKTR, "acktr_53c0b92.zip")])
def test_files_of_an_earlier_version_load_and_train(algorithm, file) -> None:
    model = algorithm.load(DATA / file, env=IdentityEnv(2), device="cpu")
    assert model.num_timesteps == 16
    if algorithm is ACKTR:
        assert model.policy.optimizer.counters["updates"] == 2
        assert model.vf_kfac_clip is None and model.kfac_refine == 0  # keywords added since: their defaults
    model.learn(16, reset_num_timesteps=False)
    assert model.num_timesteps == 32
    assert all(th.isfinite(p).all() for p in model.policy.parameters())
    with pytest.raises(ArgumentError, match="expected"):
        (TRPO if algorithm is ACKTR else ACKTR).load(DATA / file)


def test_sb3_contrib_trpo_file_loads_into_trpo(saved, tmp_path, recwarn) -> None:
    contrib = ContribTRPO.load(saved["contrib_trpo"])
    ours = TRPO.load(saved["contrib_trpo"], env=IdentityEnv(2), device="cpu")
    observations = np.arange(2)
    np.testing.assert_array_equal(
        contrib.predict(observations, deterministic=True)[0], ours.predict(observations, deterministic=True)[0]
    )
    ours.learn(16)
    assert not [w for w in recwarn if "sb3-contrib" in str(w.message)]  # discrete actions: same trust region
    # Bernoulli actions: sb3-contrib averages the KL over the 3 dimensions, ours sums it
    path = tmp_path / "multibinary.zip"
    MAKERS["contrib_trpo"](IdentityEnvMultiBinary(3)).save(path)
    with pytest.warns(UserWarning, match="averages the KL over the 3 action dimensions"):
        TRPO.load(path)


@pytest.mark.parametrize(
    "algorithm, file, kwargs, error, name",
    [
        (ACKTR, "acktr", dict(kfac_clip=float("inf")), ArgumentError, "kfac_clip"),
        (ACKTR, "acktr", dict(normalize_advantage="no"), ArgumentTypeError, "normalize_advantage"),
        (TRPO, "trpo", dict(target_kl=-1.0), ArgumentError, "target_kl"),
        (TRPO, "trpo", dict(learning_rate=float("nan")), ArgumentError, "learning_rate"),
    ],
)
def test_load_checks_the_keywords_it_sets(saved, algorithm, file, kwargs, error, name) -> None:
    with pytest.raises(error, match=f"`{name}`"):
        algorithm.load(saved[file], **kwargs)


def test_load_sets_valid_keywords(saved) -> None:
    # what rl-zoo3's `train -i` passes: the entry's hyperparameters, policy name included
    model = ACKTR.load(saved["acktr"], env=IdentityEnv(2), policy="MlpPolicy", kfac_clip=0.02, seed=1, verbose=0)
    assert model.kfac_clip == 0.02
    model.learn(16)
