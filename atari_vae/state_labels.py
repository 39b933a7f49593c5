"""Game-state labels from the emulator's RAM, as the AtariARI benchmark defines them.

The RAM addresses are those of AtariARI's ``ram_annotations.py`` (Anand et al., NeurIPS 2019,
mila-iqia/atari-representation-learning); a list of addresses becomes variables ``name_0``,
``name_1``, ... Categories follow their ``categorization.py`` (by substrings of the name).
``collect_labelled`` plays random-policy episodes and keeps each 64x64 frame with the RAM of the
same step.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from atari_vae.data import cache_dir, cache_key
from atari_vae.envs import Game, make_env, resize_uint8
from atari_vae.files import atomic_path

# game (squashed ROM id) -> variable -> RAM address, or a list of addresses for several bytes.
RAM_ANNOTATIONS: dict[str, dict[str, int | list[int]]] = {
    "asteroids": dict(enemy_asteroids_y=[3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15, 16, 17, 18, 19],
                      enemy_asteroids_x=[21, 22, 23, 24, 25, 26, 27, 30, 31, 32, 33, 34, 35, 36,
                                         37],
                      player_x=73, player_y=74, num_lives_direction=60, player_score_high=61,
                      player_score_low=62, player_missile_x1=83, player_missile_x2=84,
                      player_missile_y1=86, player_missile_y2=87, player_missile1_direction=89,
                      player_missile2_direction=90),
    "battlezone": dict(blue_tank_facing_direction=46, blue_tank_size_y=47, blue_tank_x=48,
                       blue_tank2_facing_direction=52, blue_tank2_size_y=53, blue_tank2_x=54,
                       num_lives=58, missile_y=105, compass_needles_angle=84, angle_of_tank=4,
                       left_tread_position=59, right_tread_position=60, crosshairs_color=108,
                       score=29),
    "berzerk": dict(player_x=19, player_y=11, player_direction=14, player_missile_x=22,
                    player_missile_y=23, player_missile_direction=21,
                    robot_missile_direction=26, robot_missile_x=29, robot_missile_y=30,
                    num_lives=90, robots_killed_count=91, game_level=92, enemy_evilOtto_x=46,
                    enemy_evilOtto_y=89, enemy_robots_x=list(range(65, 73)),
                    enemy_robots_y=list(range(56, 65)), player_score=list(range(93, 96))),
    "bowling": dict(ball_x=30, ball_y=41, player_x=29, player_y=40, frame_number_display=36,
                    pin_existence=list(range(57, 67)), score=33),
    "boxing": dict(player_x=32, player_y=34, enemy_x=33, enemy_y=35, enemy_score=19, clock=17,
                   player_score=18),
    "breakout": dict(ball_x=99, ball_y=101, player_x=72, blocks_hit_count=77,
                     block_bit_map=list(range(30)), score=84),
    "demonattack": dict(level=62, player_x=22, enemy_x1=17, enemy_x2=18, enemy_x3=19,
                        missile_y=21, enemy_y1=69, enemy_y2=70, enemy_y3=71, num_lives=114),
    "freeway": dict(player_y=14, score=103, enemy_car_x=list(range(108, 118))),
    "frostbite": dict(top_row_iceflow_x=34, second_row_iceflow_x=33, third_row_iceflow_x=32,
                      fourth_row_iceflow_x=31, enemy_bear_x=104, num_lives=76,
                      igloo_blocks_count=77, enemy_x=list(range(84, 88)), player_x=102,
                      player_y=100, player_direction=4, score=[72, 73, 74]),
    "hero": dict(player_x=27, player_y=31, power_meter=43, room_number=28, level_number=117,
                 dynamite_count=50, score=[56, 57]),
    "montezumarevenge": dict(room_number=3, player_x=42, player_y=43, player_direction=52,
                             enemy_skull_x=47, enemy_skull_y=46, key_monster_x=44,
                             key_monster_y=45, level=57, num_lives=58,
                             items_in_inventory_count=61, room_state=62, score_0=19,
                             score_1=20, score_2=21),
    "mspacman": dict(enemy_sue_x=6, enemy_inky_x=7, enemy_pinky_x=8, enemy_blinky_x=9,
                     enemy_sue_y=12, enemy_inky_y=13, enemy_pinky_y=14, enemy_blinky_y=15,
                     player_x=10, player_y=16, fruit_x=11, fruit_y=17, ghosts_count=19,
                     player_direction=56, dots_eaten_count=119, player_score=120,
                     num_lives=123),
    "pitfall": dict(player_x=97, player_y=105, enemy_logs_x=98, enemy_scorpion_x=99,
                    bottom_of_rope_y=18, clock_sec=89, clock_min=88),
    "pong": dict(player_y=51, player_x=46, enemy_y=50, enemy_x=45, ball_x=49, ball_y=54,
                 enemy_score=13, player_score=14),
    "privateeye": dict(player_x=63, player_y=86, room_number=92, clock=[67, 69],
                       player_direction=58, score=[73, 74], dove_x=48, dove_y=39),
    "qbert": dict(player_x=43, player_y=67, player_column=35, red_enemy_column=69,
                  green_enemy_column=105),
    "riverraid": dict(player_x=51, missile_x=117, missile_y=50, fuel_meter_high=55,
                      fuel_meter_low=56),
    "seaquest": dict(enemy_obstacle_x=list(range(30, 34)), player_x=70, player_y=97,
                     diver_or_enemy_missile_x=list(range(71, 75)), player_direction=86,
                     player_missile_direction=87, oxygen_meter_value=102,
                     player_missile_x=103, score=[57, 58], num_lives=59,
                     divers_collected_count=62),
    "skiing": dict(player_x=25, clock_m=104, clock_s=105, clock_ms=106, score=107,
                   object_y=list(range(87, 94))),
    "spaceinvaders": dict(invaders_left_count=17, player_score=104, num_lives=73, player_x=28,
                          enemies_x=26, missiles_y=9, enemies_y=24),
    "tennis": dict(enemy_x=27, enemy_y=25, enemy_score=70, ball_x=16, ball_y=17, player_x=26,
                   player_y=24, player_score=69),
    "venture": dict(sprite0_y=20, sprite1_y=21, sprite2_y=22, sprite3_y=23, sprite4_y=24,
                    sprite5_y=25, sprite0_x=79, sprite1_x=80, sprite2_x=81, sprite3_x=82,
                    sprite4_x=83, sprite5_x=84, player_x=85, player_y=26, current_room=90,
                    num_lives=70, score_1_2=71, score_3_4=72),
    "videopinball": dict(ball_x=67, ball_y=68, player_left_paddle_y=98,
                         player_right_paddle_y=102, score_1=48, score_2=50),
    "yarsrevenge": dict(player_yar_x=32, player_yar_y=31, yar_missile_x=38, yar_missile_y=37,
                        enemy_qotile_x=43, enemy_qotile_y=42, qotile_missile_x=47,
                        qotile_missile_y=46),
}

CATEGORIES = ("small_object_localization", "agent_localization", "other_localization",
              "score_clock_lives_display", "misc")
_COORDINATE_MARKS = ("_x", "_y", "_z", "_column")
_SMALL_OBJECTS = ("ball", "missile")
_AGENTS = ("agent", "player")
MIN_EPISODE_FRAMES = 64  # AtariARI keeps episodes longer than this
LABELLED_VERSION = 1  # bump when collect_labelled changes what a key yields
log = logging.getLogger(__name__)


def _key(game: Game) -> str:
    return game.rom_id.replace("_", "")


def is_annotated(game: Game) -> bool:
    """Whether AtariARI labels this game's RAM."""
    return _key(game) in RAM_ANNOTATIONS


def variables(game: Game) -> dict[str, int]:
    """Variable name -> RAM address, address lists expanded to ``name_0``, ``name_1``, ..."""
    expanded: dict[str, int] = {}
    for name, address in RAM_ANNOTATIONS.get(_key(game), {}).items():
        if isinstance(address, list):
            expanded.update({f"{name}_{i}": a for i, a in enumerate(address)})
        else:
            expanded[name] = address
    return expanded


def is_coordinate(name: str) -> bool:
    """A position on screen (AtariARI's localization variables): x, y, z or column."""
    return any(mark in name for mark in _COORDINATE_MARKS)


def categories_of(name: str) -> tuple[str, ...]:
    """The AtariARI summary categories of a variable (none, one, or several)."""
    found = []
    if is_coordinate(name):
        small = any(s in name for s in _SMALL_OBJECTS)
        if small:
            found.append("small_object_localization")
        elif any(a in name for a in _AGENTS):
            found.append("agent_localization")
        else:
            found.append("other_localization")
    if any(s in name for s in ("score", "clock", "lives", "lifes", "meter", "display")):
        found.append("score_clock_lives_display")
    if any(s in name for s in ("count", "bit_map", "existence", "level", "room", "game_state",
                               "direction")):
        found.append("misc")
    return tuple(found)


def entropy_nats(labels: np.ndarray) -> np.ndarray:
    """(N, V) integer labels -> (V,) entropy in nats of each column's empirical distribution."""
    out = np.zeros(labels.shape[1])
    for v in range(labels.shape[1]):
        p = np.bincount(labels[:, v], minlength=256) / len(labels)
        p = p[p > 0]
        out[v] = float(-(p * np.log(p)).sum())
    return out


@dataclass
class LabelledFrames:
    """Frames with the RAM of the same step; every array has the same first dimension N."""

    frames_uint8: torch.Tensor  # (N, 3, 64, 64) uint8, exactly as training preprocesses
    ram: np.ndarray  # (N, 128) uint8
    episode_ids: np.ndarray  # (N,) int64

    def labels(self, names: dict[str, int]) -> np.ndarray:
        """(N, V) int64 labels: the RAM byte of each variable, columns in ``names`` order."""
        return self.ram[:, list(names.values())].astype(np.int64)

    def subset(self, mask: np.ndarray) -> LabelledFrames:
        """Rows where the boolean ``mask`` holds."""
        return LabelledFrames(self.frames_uint8[torch.from_numpy(mask)], self.ram[mask],
                              self.episode_ids[mask])


def load_or_collect_labelled(game: Game, min_frames: int, max_steps: int,
                             seed: int) -> LabelledFrames:
    """``collect_labelled``'s frames, from the frame cache when present, else collected and
    cached."""
    key = cache_key(game, min_frames, max_steps, seed).replace("ep-", "frames-", 1)
    path = cache_dir() / f"labelled-v{LABELLED_VERSION}-{key}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as npz:
                return LabelledFrames(torch.from_numpy(npz["frames"]), npz["ram"],
                                      npz["episode_ids"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:  # truncated file
            log.warning("ignoring unreadable cache file %s (%s); collecting again", path, exc)
    labelled = collect_labelled(game, min_frames, max_steps, seed)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, frames=labelled.frames_uint8.numpy(), ram=labelled.ram,
                     episode_ids=labelled.episode_ids)
    except OSError as exc:  # a read-only or full cache must not cost the evaluation
        log.warning("could not cache labelled frames at %s: %s", path, exc)
    return labelled


def collect_labelled(game: Game, min_frames: int, max_steps: int, seed: int,
                     min_episode_frames: int = MIN_EPISODE_FRAMES) -> LabelledFrames:
    """Random-policy episodes until ``min_frames`` frames, each with the RAM of its step.

    A v5 gymnasium env (frameskip 4, sticky actions) stepped with uniform random actions, as the
    collector steps its vector env; frames are resized by ``resize_uint8`` (bit-identical to the
    collector). Episodes of ``min_episode_frames`` frames or fewer are dropped, as AtariARI does
    (at most half of ``max_steps``, so that truncated episodes always count).
    """
    min_episode_frames = min(min_episode_frames, max_steps // 2)
    env = make_env(game)
    rng = np.random.default_rng([seed, 1])
    frames, rams, episodes, total, episode = [], [], [], 0, 0
    try:
        obs, _ = env.reset(seed=seed)
        while total < min_frames:
            raw, ram = [obs], [env.unwrapped.ale.getRAM().copy()]
            for _ in range(max_steps - 1):
                obs, _, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
                if terminated or truncated:
                    break
                raw.append(obs)
                ram.append(env.unwrapped.ale.getRAM().copy())
            if len(raw) > min_episode_frames:
                frames.append(resize_uint8(np.stack(raw)))
                rams.append(np.stack(ram))
                episodes.append(np.full(len(raw), episode, dtype=np.int64))
                total += len(raw)
            episode += 1
            obs, _ = env.reset()
    finally:
        env.close()
    return LabelledFrames(torch.cat(frames), np.concatenate(rams), np.concatenate(episodes))

