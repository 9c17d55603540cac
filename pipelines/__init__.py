"""Command-line pipelines (data preparation, ...), each with a main()."""
