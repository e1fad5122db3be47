"""editkit's diffusers pipelines, one class per module.

Each module also works as a diffusers community pipeline (``custom_pipeline=<path to the file>``).
"""
