"""Command line (placeholder until the server lands)."""


def main() -> int:
    return 0
