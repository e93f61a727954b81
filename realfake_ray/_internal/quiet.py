"""What "quiet" means for a run without ``--verbose`` (no Ray import: the CLI reads it before any)."""

# No model-loading progress bars, advisory logs or deprecation notices from the libraries, in the driver
# and in every worker (one copy per actor and per Ray Train worker in the job log); errors still print.
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
}
