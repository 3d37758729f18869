"""The diffusers host: batch generation (`python -m npo_suite generate`)."""
