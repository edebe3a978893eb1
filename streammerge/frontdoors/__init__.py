"""Command lines of other tools, translated into streammerge calls (mergekit_cli: mergekit-yaml,
mergekit-multi)."""

