"""Who plays the collected episodes: the random policy, or a registered controller for a share
of them (``train --collect_policy models:/<controller>@<alias> --policy_mix 0.5``).

Whether episode r is the controller's is a function of the seed and r alone, and so is its
epsilon mask (which steps take the chain's random action instead), so collection stays
reproducible per episode. The controller encodes one frame at a time: a batch of other envs'
frames could change the floats, and an argmax with them. Its version is resolved once (an alias
may move later) and is part of the frame cache key, with the mix and epsilon.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from atari_vae.controller import Policy, make_features
from atari_vae.envs import Game
from atari_vae.errors import AtariVaeError

RANDOM = "random"
EPSILON = 0.1  # share of a controller episode's steps that take the random action instead


@dataclass
class CollectPolicy:
    """A registered controller (with its VAE) playing ``mix`` of the episodes."""

    policy: Policy
    source: str  # models:/<name>/<version>, resolved
    mix: float
    epsilon: float = EPSILON

    @property
    def key(self) -> str:
        """What the frame cache key adds for this policy."""
        return f"{self.source} mix={self.mix} epsilon={self.epsilon}"

    @property
    def stem(self) -> str:
        """A readable part of the cache folder name."""
        name, version = self.source[len("models:/"):].rsplit("/", 1)
        return f"mix{self.mix:g}-{name}-v{version}"

    def plays(self, seed: int, number: int) -> bool:
        """Whether the controller plays episode ``number`` of ``seed``."""
        return bool(np.random.default_rng([seed, number, 2]).random() < self.mix)

    def random_steps(self, seed: int, number: int, max_steps: int) -> np.ndarray:
        """Which steps of a controller episode take the random action (epsilon-random)."""
        return np.random.default_rng([seed, number, 3]).random(max_steps) < self.epsilon

    def act(self, frame_hwc: np.ndarray, prev_mu: np.ndarray | None
            ) -> tuple[int, np.ndarray]:
        """(action, mu) for one 64x64 HWC uint8 frame, given the previous step's mu."""
        vae, ctrl = self.policy.vae, self.policy.controller
        x = torch.from_numpy(np.ascontiguousarray(frame_hwc.transpose(2, 0, 1)))[None]
        with torch.no_grad():
            mu = vae.encode(x.float().div_(255.0))[0].numpy()
        return int(ctrl.act(make_features(mu, prev_mu, ctrl.features))[0]), mu


def resolve(collect_policy: str, mix: float, game: Game) -> CollectPolicy | None:
    """None for ``random``; else the controller at that URI, its version pinned."""
    if collect_policy == RANDOM or mix == 0:
        return None
    from atari_vae import policy_registry, tracking

    tracking.configure()
    name, _, alias = collect_policy[len("models:/"):].partition("@")
    if alias:
        version = policy_registry.vae_version_at(name, alias, policy_registry.CONTROLLER_HINT)
    else:
        name, version = collect_policy[len("models:/"):].rsplit("/", 1)
    policy = policy_registry.load_policy(name, version=version)
    trained_on = policy.controller.metadata.get("game")
    if trained_on and trained_on != game.title:
        raise AtariVaeError(f"--collect_policy {collect_policy} plays {trained_on}, not "
                            f"{game.title}")
    if policy.serve != "controller":  # collection plays it without an env that serves for it
        raise AtariVaeError(f"--collect_policy {collect_policy} was planned with --serve "
                            f"{policy.serve} and would wait for a serve it never makes; use a "
                            "controller planned with --serve controller (the default)")
    return CollectPolicy(policy, f"models:/{name}/{version}", mix)
