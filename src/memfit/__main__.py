"""`python -m memfit ...` (and `torchrun -m memfit train ...`): the same command line as `memfit`."""

from memfit.cli import main

if __name__ == "__main__":
    main()
