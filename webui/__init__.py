"""Forge / Automatic1111 support: the WebUI-independent half of `scripts/npo_webui.py`.

Nothing here imports `modules.*` or gradio; all of it is testable with plain torch
(tests/test_webui_logic.py). One module per concern:

  settings.py        the panel's values (`NPOSettings`): validation, infotext round trip, paste
  infotext.py        the infotext keys, and the `NPO error` line written when NPO fails
  offset_files.py    listing / resolving the offset files the panel offers, the loaded-offset cache
  offset_notes.py    the panel's note on a chosen file, the coverage line of a generation
  ldm_keys.py        offset keys (diffusers paths) -> the WebUI UNet's LDM module paths
  plan.py            one generation's plan (`NPOPlan`, `build_plan`): offsets mapped, weights, row groups
  runtime.py         per-row offsets on one batched forward (`NPORuntime`, `core.branch_lora` hooks)
  row_layouts.py     which rows are unconditional in Forge and in A1111 (`A1111RowCursor`)
  forge_wrapper.py   Forge: the `model_function_wrapper` (`ForgeNPOWrapper`)
  a1111_session.py   A1111: the per-batch session on its own forward (`A1111Session`), refusals
  verify.py          the opt-in merged-weights check (NPO_SUITE_VERIFY, `VerifyLog`)
  xyz_axes.py        the NPO axes of the X/Y/Z plot script
"""
