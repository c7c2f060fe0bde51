"""`python -m perceptio ...` runs the command line (also how torchrun launches it)."""

from perceptio.cli.main import main

main()
