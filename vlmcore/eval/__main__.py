"""``python -m vlmcore.eval`` = the ``vlmcore-eval`` console script (:mod:`vlmcore.eval.cli`)."""

from vlmcore.eval.cli import console_main

if __name__ == "__main__":
    console_main()
