"""The `smartmail` command line (typer)."""
