"""`python -m smartmail.cli`: the same as the `smartmail` command."""

from smartmail.cli.main import main

main()
