"""Batch compute: pure partition functions plus drivers; local and Spark runners."""
