"""Looking at models without merging them: whether they can be merged, and how far apart they are."""
