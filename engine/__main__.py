"""``python -m engine`` and the ``guichet`` command."""

import sys


def run() -> int:
    if sys.argv[1:2] == ["serve"]:
        # Before the engine's imports, most of a second under load: a stop sent meanwhile
        # is kept (early_stop).
        from engine import early_stop

        early_stop.keep()
    from engine.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(run())
