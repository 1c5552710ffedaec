"""Placeholder entry point: the command lands with its issue."""
import sys


def main() -> None:
    sys.exit(f"{sys.argv[0]}: not yet available in this version of xlabml")
