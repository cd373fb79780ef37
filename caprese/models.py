"""Placeholder replaced by the models/data work (issue 3)."""


def add_cli(subparsers) -> None:
    pass
