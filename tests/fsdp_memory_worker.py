"""One process of tests/test_fsdp.py's memory check, run under torchrun: `loop.train` on the config file
argv[1], measured by PyTorch's CPU allocator (`memory_estimate.measure_train`); writes argv[2]/rank<R>.json."""
import json
import os
import sys
from pathlib import Path

from npo_suite.trainer.config import load_config
from npo_suite.trainer.memory_estimate import measure_train

measured = measure_train(load_config(config=sys.argv[1]))
Path(sys.argv[2], f"rank{os.environ['RANK']}.json").write_text(json.dumps(measured))
