"""Few-shot adaptation jobs, job tables (sweeps) and result reports."""

from .job import (FULLFT, MARKER_FILE, RESULT_FILE, AdaptJob, JobError, is_complete, run_job, setup_model)

__all__ = ["AdaptJob", "FULLFT", "JobError", "MARKER_FILE", "RESULT_FILE", "is_complete", "run_job", "setup_model"]
