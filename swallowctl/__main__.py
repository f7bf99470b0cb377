"""`python -m swallowctl` (and `accelerate launch -m swallowctl`)."""

from swallowctl.cli import main

main()
