"""Evaluate a trained VAE on fresh episodes (flags: --model_path, --env_name, --num_samples, ...).

    python experiments/evaluate_vae.py --model_path outputs/vae_training/best_model.pt
"""

from atari_vae.cli import evaluate

if __name__ == "__main__":
    evaluate(prog_name="evaluate_vae.py")
