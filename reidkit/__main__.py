"""`python -m reidkit` runs the command-line interface."""

from reidkit.cli import app

if __name__ == "__main__":
    app()
