"""`python -m sasa_bench ...` (the form torchrun launches)."""

from sasa_bench.cli.app import main

if __name__ == "__main__":
    main()
