"""Forge / Automatic1111 support: the WebUI-independent half of `scripts/npo_webui.py`.

Nothing here imports `modules.*` or gradio: `logic.py` holds the settings, infotext, row
layouts of both WebUIs, offset-file listing and the per-row NPO runtime, all testable with
plain torch (tests/test_webui_logic.py).
"""
