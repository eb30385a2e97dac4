"""The scripts that write and check the docs, run from the root: python -m docs.walkthrough."""
