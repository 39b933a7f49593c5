"""``python -m atari_vae``: the same commands as ``atari-vae``."""

from atari_vae.cli import main

main(prog_name="atari-vae")
