"""The one documented command that installs what the real-host test suites need beyond the host itself
(docs/comfyui.md "Real-ComfyUI tests"; tests/test_install.py checks the docs quote it verbatim). Run from
the repository root with the host's Python as PY; the installed torch is pinned so pip cannot replace it;
chromium comes from Debian (never a `playwright install` browser download)."""

COMFYUI_TESTS_INSTALL = ('apt-get install -y chromium && PY=/path/to/ComfyUI/venv/bin/python && '
                         '$PY -m pip install -e ".[dev,browser]" "torch==$($PY -c \'import torch; print(torch.__version__)\')"')
