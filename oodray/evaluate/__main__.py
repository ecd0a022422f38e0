"""`python -m oodray.evaluate` (the command lives in oodray.evaluate.command)."""

from oodray.cli import run
from oodray.evaluate.command import main

run(main)
