# -*- test-case-name: tests.e2e.test_cli -*-
"""`python -m bioproxy`: the `bioproxy` command."""

from .cli import main

main()
