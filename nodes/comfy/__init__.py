"""The ComfyUI host room: the code behind the node shells that works on ComfyUI's objects.

Sampling (NPO / SNPO guidance):
  branch.py    NPO offsets on ComfyUI MODEL / CLIP objects: key mapping, weight patches, guiders
               (imports ComfyUI)
  rows.py      the `model_function_wrapper` giving each row of ComfyUI's batched forward its offsets
               (plain torch)
Training (the Train Preference LoRA node; none of these imports ComfyUI at module level):
  backend.py   `ComfyBackend`: the trainer's Backend protocol on ComfyUI's MODEL, CLIP and VAE
  session.py   the node's widgets (order, TrainConfig from them) and one run through `trainer.loop.train`
  datasets.py  the node's datasets: a file or folder of the datasets folder, IMAGE tensors, typed prompts
  progress.py  the node's live progress text and loss-curve preview, outputs as IMAGE tensors
  memory.py    the training working set, reserved with ComfyUI's model management before the first step

The trainer imports nothing from here; these modules import the trainer and core.
"""
