"""``python -m lightning_linearity``: the same command line as the ``lightning-linearity`` script."""

from lightning_linearity.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
