"""Batch runs: `python scripts/npo_demo.py ARGS` is `python -m npo_suite demo ARGS` (needs `pip install -e .`).

Kept import-free at module level: Forge/A1111 load every file in scripts/ as a WebUI script.
"""
if __name__ == "__main__":
    import sys

    from npo_suite.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
