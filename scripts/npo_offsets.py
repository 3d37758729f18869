"""Batch runs: `python scripts/npo_offsets.py ARGS` is `python -m npo_suite offsets ARGS` (needs `pip install -e .`).

Kept import-free at module level: Forge/A1111 load every file in scripts/ as a WebUI script.
"""
if __name__ == "__main__":
    import sys

    from npo_suite.cli import main

    sys.exit(main(["offsets", *sys.argv[1:]]))
