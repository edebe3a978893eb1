"""Command lines and configs of other tools, translated into streammerge calls (mergekit_cli:
mergekit-yaml, mergekit-multi; model_merger: ModelMerger's merge_config files and API)."""
