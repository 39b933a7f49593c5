"""Train a VAE on Atari frames (the original script's flags: --env_name, --latent_dim, ...).

    python experiments/train_atari_vae.py --env_name Breakout --num_episodes 5 --epochs 10
"""

from atari_vae.cli import train

if __name__ == "__main__":
    train(prog_name="train_atari_vae.py")
