"""The `l4lb` command."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from . import commands  # noqa: PLC0415

    return commands.main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
