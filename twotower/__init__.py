"""Command-line entry point `twotower`; sits outside the stage packages so it may import all of them."""
