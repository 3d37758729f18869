"""Batch runs: `python scripts/npo_train.py ARGS` is `python -m npo_suite train ARGS` (needs `pip install -e .`).

Kept import-free at module level: Forge/A1111 load every file in scripts/ as a WebUI script.
"""
if __name__ == "__main__":
    import sys

    from npo_suite.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
