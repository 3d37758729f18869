"""Training data: sources -> transforms -> latent/text cache -> datasets, sampler, collates.

  records.py        PairRecord, PromptRecord, DataSummary (skip counters), load_image
  pairs.py          the `Source` base (ids de-duplicated, skips counted) and the Pick-a-Pic parquet / HF,
                    JSONL and folder pair sources (`open_pairs`)
  prompts.py        prompt files and captioned image folders (`open_prompts`)
  transforms.py     ImageTransform (resize, center/random crop, flip, SDXL size conditioning)
  cache.py          LatentCache: latents + text embeddings on disk, encoded once
  dataset.py        PairDataset, PromptDataset, ResumableSampler, collate_pairs, collate_prompts
  ddspo_dataset.py  DdspoDataset: a `ddspo-prepare` folder (core/ddspo_format.py) for training

See docs/data.md. Submodules are imported explicitly (nothing heavy is imported here).
"""
