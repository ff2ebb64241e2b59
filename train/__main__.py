"""``python -m vlmcore.train --config FILE.yaml [key=value ...]`` = the ``vlmcore-train`` console script."""

from vlmcore.train.cli import console_main, main

__all__ = ["console_main", "main"]

if __name__ == "__main__":
    console_main()
