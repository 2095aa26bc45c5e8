"""`python -m bioproxy`: the `bioproxy` command."""

from .cli import main

main()
