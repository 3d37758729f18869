"""NPO Suite: ComfyUI entry point (V3 `comfy_entrypoint`), and nothing else.

When imported as the `npo_suite` package (CLI, tests, Forge), nothing ComfyUI-specific is
imported: the node modules load lazily, only when ComfyUI calls the entry point.
"""

__version__ = "0.1.0"
# the hand-picking widget of Collect Preference Pairs (ComfyUI serves it as /extensions/<folder>/...).
# Declared here only: a pyproject [tool.comfy] `web` entry would register the folder a second time
# under the project name, and the frontend would load the script twice.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import NPOSuiteExtension

    return NPOSuiteExtension()
