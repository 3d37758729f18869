"""The diffusers host: model loading and batch generation (`python -m npo_suite generate`)."""
