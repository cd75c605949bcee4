"""`python -m npp ...`: the npp command (what torchrun and srun start: `-m npp train ...`)."""

from npp.app.cli import main

main()
