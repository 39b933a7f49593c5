"""The benchmark scripts still run against the package they measure (tiny sizes, real parts)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import types

import pytest

from atari_vae.config import TrainConfig
from tests.conftest import REPO

STORE_BENCH = REPO / "benchmarks" / "store_bench.py"


def _run(*args: str) -> object:
    done = subprocess.run([sys.executable, str(STORE_BENCH), *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_store_bench_trains_from_the_store_and_from_ram_with_the_default_model():
    result = _run("ab", "--episodes", "3", "--steps", "2", "--rounds", "1")
    assert set(result["images_per_s"]) == {"store", "ram"}
    assert all(rates[0] > 0 for rates in result["images_per_s"].values())
    row = _run("train", "--episodes", "3", "--steps", "2", "--mode", "store")
    assert row["images_per_s"] > 0 and row["epoch_images"] == row["train_frames"]


def test_store_bench_counts_every_process_frames_when_collection_is_split():
    rows = _run("procs", "--games", "Breakout", "--episodes", "2", "--procs", "1,2")
    assert [r["processes"] for r in rows] == [1, 2]
    assert all(r["frames"] > 2 and r["frames_per_s"] > 0 for r in rows)


def test_recipes_trains_scores_both_seeds_and_tabulates_each_recipe(tmp_path):
    out = tmp_path / "recipes"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "recipes.py"), "--device", "cpu",
         "--out", str(out), "--eval_flags", "--num_samples 40 --max_steps 60 --probe_frames 1200",
         "tiny=--num_episodes 3 --max_steps 60 --epochs 1 --batch_size 32 --latent_dim 8"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI":
             f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = json.loads((out / "results.json").read_text())
    assert "error" not in result, result
    assert result["epochs"] == 1 and result["train_frames"] > 0 and result["train_s"] > 0
    probed, pixels_only = result["10000"], result["20000"]
    assert 0 <= probed["fg_accuracy"] <= 1 and 0 <= pixels_only["fg_accuracy"] <= 1
    assert "probe_score" in probed and "probe_score" not in pixels_only
    assert "| tiny | " in done.stdout


def _script(name: str) -> types.ModuleType:
    """``benchmarks/<name>.py`` imported as a module (the benchmarks are scripts, not a package)."""
    path = REPO / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipes_table_shows_a_dash_for_figures_a_game_does_not_have():
    recipes = _script("recipes")
    pixels = {"fg_accuracy": 0.9, "psnr": 30.0, "baseline_psnr": 20.0, "object_recall": 0.5}
    probed = {**pixels, "probe_score": 0.55, "probe_random_init": 0.4}  # SpaceInvaders: no ball
    run = {"recipe": "si", "train_s": 10.0, "epochs": 1, "train_frames": 64, "flags": "",
           10000: probed, 20000: pixels}
    assert recipes.table([run]).splitlines()[-1] == (
        "| si | 10 | 1 | 1 | 0.900 / 0.900 | +10.00 / +10.00 | 0.500 | 0.550 (0.400) | - / - | "
        "- / - (- / -) |")


def test_recipes_over_seeds_runs_each_recipe_per_seed_and_prints_its_spread(tmp_path):
    out = tmp_path / "recipes"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "recipes.py"), "--device", "cpu",
         "--out", str(out), "--eval_flags", "--num_samples 40 --max_steps 60 --probe_frames 1200",
         "--seeds", "42,43",
         "tiny=--num_episodes 3 --max_steps 60 --epochs 1 --batch_size 32 --latent_dim 8"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI":
             f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["recipe"] for r in results] == ["tiny_s42", "tiny_s43"]
    assert [r["flags"].split()[-2:] for r in results] == [["--seed", "42"], ["--seed", "43"]]
    scores = sorted(r["10000"]["probe_score"] for r in results)
    found = re.search(r"tiny over 2 of seeds 42 43: game score min ([\d.]+), median ([\d.]+), "
                      r"max ([\d.]+), mean ([\d.]+); fg accuracy mean ([\d.]+)", done.stdout)
    assert found, done.stdout[-2000:]
    assert [float(found[i]) for i in (1, 3)] == pytest.approx(scores, abs=1e-3)
    assert float(found[2]) == pytest.approx(sum(scores) / 2, abs=1e-3)
    assert float(found[5]) == pytest.approx(
        sum(r["10000"]["fg_accuracy"] for r in results) / 2, abs=1e-3)


def test_recipes_over_seeds_refuses_a_recipe_that_sets_its_own_seed(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "recipes.py"), "--seeds", "42,43",
         "s=--seed 7"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(
        "--seeds sets each run's --seed; leave --seed out of the recipes")
    assert not (tmp_path / "outputs").exists()


def test_bench_runs_the_chosen_sections_in_order_and_writes_every_row(tmp_path):
    """bench.py's in-process sections and one end-to-end job (bench_jobs.py), at their real
    sizes; the rows land in the JSON in the order the sections run."""
    rows_json = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench.py"), "--only", "quick,machine,peak",
         "--threads", "1", "--workdir", str(tmp_path / "work"), "--json", str(rows_json)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(rows_json.read_text())
    assert [r["section"] for r in rows] == sorted(
        (r["section"] for r in rows), key=["machine", "peak", "quick", "total"].index)
    peaks = [r for r in rows if r["section"] == "peak"]
    assert peaks and all(r["unit"] == "GFLOP/s" and r["value"] > 0 for r in peaks)
    (quick,) = [r for r in rows if r["section"] == "quick"]
    assert quick["unit"] == "s" and quick["value"] > 0 and "the rest" in quick["note"]
    assert (tmp_path / "work" / "quick" / "final_model.pt").exists()
    assert "quick test wall" in done.stdout


def test_bench_names_the_allowed_sections_when_given_an_unknown_one(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench.py"), "--only", "machine,peek"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(
        "unknown sections ['peek']; allowed: machine, peak, train, collect, planner, quick, "
        "samejob, tune")


def test_gpu_check_script_trains_scores_both_seeds_and_prints_its_summary(tmp_path):
    """benchmarks/gpu.sh waits for a GPU machine; its CPU dry run keeps it from rotting."""
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh")], capture_output=True, text=True,
        timeout=600, env={
            **os.environ, "PYTHON": sys.executable, "GPU_CHECK_DEVICE": "cpu",
            "GPU_CHECK_TESTS": "0", "GPU_CHECK_DIR": str(tmp_path / "gpu-check"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "TRAIN_FLAGS": "--num_episodes 3 --max_steps 60 --epochs 2 --batch_size 32 "
                           "--latent_dim 8",
            "EVAL_FLAGS": "--num_samples 40 --max_steps 60 --probe_frames 1200"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"gpu.sh took \d+ s", done.stdout)
    summary = done.stdout[done.stdout.index("train wall"):]
    assert re.search(r"epochs 2, [\d.]+ s, [\d,]+ images/s", summary)
    assert "steps: eager (no CUDA graph)" in summary
    probed, pixels_only = re.findall(r"held-out seed (\d+): (.*)", summary)
    assert probed[0] == "10000" and "probe_score " in probed[1]
    assert pixels_only[0] == "20000" and "probe_score" not in pixels_only[1]
    assert "fg_accuracy" in pixels_only[1]


def test_probe_survival_bounds_the_ball_r2_on_all_frames_by_what_the_pixels_show(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "probe.py"), "survival", "--game", "Breakout",
         "--frames", "3000"], capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if "on all frames" in line]
    assert [line.split(":")[0].strip() for line in lines] == ["ball_x", "ball_y"]
    one_object, all_frames = (float(v) for v in re.findall(r"-?\d+\.\d{3}", lines[0]))
    assert 0.95 < one_object <= 1.0 and all_frames < one_object  # an off-screen ball: unknowable


def test_profile_step_splits_a_real_training_step_into_convolutions_and_the_rest(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "profile_step.py"), "--precision", "fp32",
         "--threads", "1", "--steps", "2"], capture_output=True, text=True, timeout=600,
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    conv, rest = (int(v) for v in re.findall(r"(\d+)% of self CPU time, the rest (\d+)%",
                                             done.stdout)[0])
    assert conv + rest in (99, 100, 101) and conv > 30  # convolutions dominate the step
    found = re.findall(
        r"convolutions: ([\d.]+) GFLOP a step in (\d+) ms of their own: (\d+) GFLOP/s, "
        r"(\d+)% of the fp32 matmul peak", done.stdout)
    assert found, done.stdout[-2000:]
    gflop, ms, rate, share = found[0]
    # the default net's convolutions, forward and backward: ~0.083 GFLOP a frame
    assert 0.04 < float(gflop) / TrainConfig().batch_size < 0.16
    assert int(rate) == pytest.approx(float(gflop) / (int(ms) / 1e3), rel=0.1, abs=2)
    assert 0 < int(share) <= 150  # their own rate, measured against a separately timed peak


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_profile_step_splits_by_layer_and_times_the_step_eager_and_compiled(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "profile_step.py"), "--precision", "fp32",
         "--threads", "1", "--steps", "1", "--by_shape", "--compile", "--rounds", "2"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    # --by_shape: the first layer's row has its own
    assert f"[{TrainConfig().batch_size}, 3, 64, 64]" in done.stdout
    rounds = re.findall(r"round \d: eager (\d+) images/s, compiled (\d+) images/s", done.stdout)
    assert len(rounds) == 2 and all(int(v) > 0 for pair in rounds for v in pair)
    found = re.search(r"eager (\d+)-(\d+) images/s, loss under torch.compile (\d+)-(\d+) "
                      r"images/s \(compiled in \d+ s\), median ratio (\d+\.\d+)x", done.stdout)
    assert found, done.stdout[-2000:]
    low, high = sorted(int(v) for v, _ in rounds), sorted(int(c) for _, c in rounds)
    assert (int(found[1]), int(found[2])) == (low[0], low[1])  # the range of the rounds
    assert (int(found[3]), int(found[4])) == (high[0], high[1])


def test_probe_baselines_with_pixels_scores_the_raw_frames_beside_the_random_encoder(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "probe.py"), "baselines", "--game", "Breakout",
         "--frames", "1500", "--pixels", "--init_draws", "2"], capture_output=True, text=True,
        timeout=600, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO),
                                        "ATARI_VAE_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr[-3000:]
    header = next(line for line in done.stdout.splitlines() if line.startswith("variable"))
    assert header.split()[3:10:2] == ["majority", "random_init", "random_init+1", "pixels"]
    scores = [float(v) for v in next(line for line in done.stdout.splitlines()
                                     if line.startswith("game score")).split()[2:]]
    assert len(scores) == 4 and all(0.0 <= s <= 1.0 for s in scores)
    assert scores[3] > scores[0]  # the frames say more than the most common value
    spread = re.search(r"random-init game score over 2 draws \(init seeds (\d+)-(\d+)\): min "
                       r"([\d.]+), median ([\d.]+), max ([\d.]+), mean ([\d.]+)", done.stdout)
    assert spread and int(spread[2]) == int(spread[1]) + 1, done.stdout[-2000:]
    draws = sorted(scores[1:3])
    assert [float(spread[i]) for i in (3, 5)] == pytest.approx(draws, abs=1e-3)
    assert float(spread[4]) == pytest.approx(sum(draws) / 2, abs=1e-3)


@pytest.mark.parametrize("script, args, message", [
    ("profile_step.py", ["--rounds", "0"], "--rounds must be at least 1, got 0"),
    ("probe.py", ["baselines", "--init_draws", "0"], "--init_draws must be at least 1, got 0")])
def test_a_count_below_one_is_refused_in_one_line(script, args, message):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(message)


def test_probe_budget_scores_one_model_on_one_split_at_evaluates_budget_and_a_longer_one(
        tmp_path):
    import torch

    from atari_vae.model import VAE
    from atari_vae.probe import ProbeSettings

    torch.save(VAE(mask=True, locator=True).state_dict(), tmp_path / "model.pt")
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "probe.py"), "budget", "--game",
         "Breakout", "--model", str(tmp_path / "model.pt"), "--frames", "1500",
         "--max_epochs", "30", "--lr", "0.05"], capture_output=True, text=True, timeout=600,
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO),
                           "ATARI_VAE_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.splitlines()
    budgets = [line for line in out if line.startswith(("protocol:", "longer:"))]
    assert [b.split(":")[0] for b in budgets] == ["protocol", "longer"]
    evaluates = ProbeSettings()
    assert f"lr={evaluates.lr}," in budgets[0]
    assert f"max_epochs={evaluates.max_epochs}," in budgets[0]
    assert "lr=0.05," in budgets[1] and "max_epochs=30," in budgets[1]
    splits = [line.split(";")[0] for line in out if "probe-train" in line]
    assert len(splits) == 2 and splits[0] == splits[1]  # the same frames and split for both
    scores = [[float(v) for v in line.split()[2:]] for line in out
              if line.startswith("game score")]
    assert len(scores) == 2 and all(len(s) == 3 and 0.0 <= min(s) <= max(s) <= 1.0
                                    for s in scores)  # majority, model, random init


def test_probe_codes_reads_the_ball_s_byte_from_a_wave_code_not_from_a_line(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "probe.py"), "codes", "--game", "Breakout",
         "--frames", "1500", "--frequencies", "4", "--all_objects"], capture_output=True,
        text=True, timeout=600,
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO),
                           "ATARI_VAE_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    header = next(line for line in lines if line.startswith("variable"))
    assert header.split()[3:14:2] == ["majority", "line", "onehot", "fourier4",
                                      "all_objects", "objects_head"]
    for name in ("ball_x", "ball_y"):
        majority, line, onehot, fourier, all_objects, head = (
            float(v) for v in next(row for row in lines if row.startswith(name)).split()[2:8])
        # a byte classifier splits a wave code (or one-hot pixels) far better than a line
        assert fourier > line + 0.2 and onehot > line + 0.2 and fourier > majority
        # with one ball the sum of every object's waves is the ball's: as readable; the
        # label-free version of it (each object's mean wave over its pixels) a little less
        assert abs(all_objects - fourier) < 0.05 and head > line + 0.15


def test_probe_rules_finds_more_small_pixels_everywhere_and_more_again_at_reach_0(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "probe.py"), "rules", "--game",
         "SpaceInvaders", "--num_episodes", "2", "--frames", "300"], capture_output=True,
        text=True, timeout=600,
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO),
                           "ATARI_VAE_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr[-3000:]
    rules = [line for line in done.stdout.splitlines() if "by row:" in line]
    assert [line.split(":")[0] for line in rules] == [
        "usually empty, reach 2 (the default)", "everywhere, reach 2", "everywhere, reach 0"]
    per_frame = [float(line.split(" a frame")[0].split(", ")[-1]) for line in rules]
    # a wider region and a shorter reach can only add small pixels; the score digits are some
    assert per_frame[0] <= per_frame[1] <= per_frame[2] and per_frame[1] > per_frame[0]


def test_objects_fourier_code_sums_each_object_s_intensity_weighted_mean_wave():
    import torch

    from atari_vae.losses import fourier_code

    probe_bench = _script("probe")
    frames = torch.zeros(3, 3, 64, 64)
    frames[1, :, 10, 20], frames[1, :, 11, 20] = 0.9, 0.3  # one 2-pixel object
    frames[2, :, 10, 20], frames[2, :, 40, 50] = 0.6, 0.6  # two 1-pixel objects
    small = (frames.amax(dim=1, keepdim=True) > 0).float()
    periods = torch.tensor([64.0, 25.4, 10.1, 4.0])
    code = probe_bench.objects_fourier_code(small, frames, torch.zeros(1, 3, 64, 64), periods)
    assert code[0].abs().max().item() == 0.0  # nothing in view: every wave 0
    at = fourier_code(torch.tensor([[10.0, 20.0], [11.0, 20.0], [40.0, 50.0]]), periods)
    assert torch.allclose(code[1], 0.75 * at[0] + 0.25 * at[1], atol=1e-5)  # weighted 0.9 : 0.3
    assert torch.allclose(code[2], at[0] + at[2], atol=1e-5)  # two objects: the sum, no labels
    close = frames[2:].clone()
    close[0, :, 40, 50], close[0, :, 10, 22] = 0.0, 0.6  # the second object 2 px from the first
    shared = probe_bench.objects_fourier_code((close.amax(dim=1, keepdim=True) > 0).float(),
                                              close, torch.zeros(1, 3, 64, 64), periods)
    pair = fourier_code(torch.tensor([[10.0, 20.0], [10.0, 22.0]]), periods)
    assert torch.allclose(shared[0], pair.mean(dim=0), atol=1e-5)  # counted as one, not two
