"""``python -m engine`` and the ``guichet`` command."""

import sys


def run() -> int:
    if sys.argv[1:2] == ["serve"]:
        # Before the imports, which take a second or more: a stop sent meanwhile is kept.
        from engine import early_stop

        early_stop.keep()
    from engine.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(run())
