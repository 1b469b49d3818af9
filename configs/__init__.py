"""Run configurations as data (ml_collections ConfigDicts), loaded with config_flags."""
