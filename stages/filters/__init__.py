"""Filters: stages that score a record and may drop it on purpose (`stages.base.Filtered`)."""
