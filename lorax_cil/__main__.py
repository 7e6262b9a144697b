"""`python -m lorax_cil` runs the command-line interface (also under torchrun)."""

from lorax_cil.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
